// QTIP's bitshift trellis on CPU (tensors/trellis.py holds the definitions; tensors/viterbi.py
// the torch reference these must equal).
//
// discq::viterbi_cpu: the best walk of each sequence, one sequence per thread at a time. A step
// streams the state value table once, forming each state's cost and reducing it into the
// minimum of its successors' group in the same pass (eight groups a vector); one back-pointer
// byte per group and step.
//
// discq::trellis_linear_cpu: y = x Ŵᵀ with Ŵ the unscaled coded matrix, for few activation
// rows: eight tiles at a time in AVX2 lanes (trellis_lanes.cpp), or, in a portable build, each
// 16×16 tile decoded from its bitstream into a stack buffer (the code's value computed from
// each state, no table of 2^16 entries) and dotted with every row.
//
// discq::qtip_linear_cpu: QTIP's whole linear in one call (a decode step makes ~200 of them):
// the input's randomized Hadamard transform, the trellis product, the scale, the output's
// inverse transform and the bias; x [..., K] in any float type. Above 16 rows (prefill,
// evaluation) the weight is decoded once and multiplied by one GEMM.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "hadamard_cpu.h"
#include "simd.h"
#include "trellis_lanes.h"

namespace {

constexpr int kTile = 16;
constexpr int kTileSize = kTile * kTile;

// ---- Viterbi ---------------------------------------------------------------------------------

struct Trellis {
  int L, kV, V, T;
  const float* values;  // [V][2^L], one array per coordinate
};

// One step, fused: D_t(s) = m_t(s >> kV) + ‖x_t − c(s)‖² is formed and reduced at once,
// m_{t+1}(u) = min_j D_t(j·G + u) and back(u) = that j (the first on ties). D is never
// stored: a step streams the value table once and touches two arrays of G floats.
inline float cost(const Trellis& P, const float* x_t, int64_t s) {
  float d = 0.f;
  for (int v = 0; v < P.V; ++v) {
    const float e = x_t[v] - P.values[(v << P.L) + s];
    d += e * e;
  }
  return d;
}

void step_scalar(const Trellis& P, const float* x_t, const float* m, float* m_next,
                 uint8_t* back) {
  const int64_t G = int64_t{1} << (P.L - P.kV);
  for (int64_t u = 0; u < G; ++u) {
    float best = std::numeric_limits<float>::infinity();
    uint8_t arg = 0;
    for (int j = 0; j < (1 << P.kV); ++j) {
      const int64_t s = j * G + u;
      const float d = m[s >> P.kV] + cost(P, x_t, s);
      if (j == 0 || d < best) best = d, arg = uint8_t(j);
    }
    m_next[u] = best, back[u] = arg;
  }
}

#ifdef DISCQ_AVX2
// m_t(s >> kV) for eight consecutive states s0..: one group when kV >= 3, two when kV = 2.
inline __m256 group_base(const float* m, int64_t s0, int kV) {
  if (kV >= 3) return _mm256_set1_ps(m[s0 >> kV]);
  if (kV == 2) return _mm256_set_m128(_mm_set1_ps(m[(s0 >> 2) + 1]), _mm_set1_ps(m[s0 >> 2]));
  const float* g = m + (s0 >> 1);
  return _mm256_set_ps(g[3], g[3], g[2], g[2], g[1], g[1], g[0], g[0]);
}

// 8 int32 (each < 256) -> 8 bytes in order (the packs work within 128-bit lanes)
inline void store_bytes(uint8_t* dst, __m256i idx) {
  const __m256i w = _mm256_packus_epi16(_mm256_packs_epi32(idx, idx), idx);
  const __m256i v = _mm256_permutevar8x32_epi32(w, _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(v));
}

// One step of P sequences in lock step: each value of the table is loaded once for all P
// (the table, 2^L·V floats, is what a step streams), and the P minimum chains interleave.
template <int P_>
void step_many(const Trellis& P, const float* const* x_t, float* const* m, float* const* m_next,
               uint8_t* const* back) {
  const int64_t G = int64_t{1} << (P.L - P.kV);
  const float* c0 = P.values;
  const float* c1 = P.values + (int64_t{1} << P.L);
  const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  const __m256 all = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  for (int64_t u = 0; u < G; u += 8) {
    __m256 best[P_], arg[P_];
    for (int p = 0; p < P_; ++p) best[p] = inf, arg[p] = _mm256_setzero_ps();
    for (int j = 0; j < (1 << P.kV); ++j) {
      const int64_t s = j * G + u;
      const __m256 jf = _mm256_set1_ps(float(j));
      const __m256 v0 = _mm256_loadu_ps(c0 + s);
      const __m256 v1 = P.V > 1 ? _mm256_loadu_ps(c1 + s) : v0;
      for (int p = 0; p < P_; ++p) {
        // broadcast from L1 each time: P_ pairs of registers would spill
        const __m256 e0 = _mm256_sub_ps(_mm256_broadcast_ss(x_t[p]), v0);
        __m256 d = _mm256_fmadd_ps(e0, e0, group_base(m[p], s, P.kV));
        if (P.V > 1) {
          const __m256 e1 = _mm256_sub_ps(_mm256_broadcast_ss(x_t[p] + 1), v1);
          d = _mm256_fmadd_ps(e1, e1, d);
        }
        // j = 0 is taken unconditionally, so an all-infinite group still names a predecessor
        const __m256 lt = j ? _mm256_cmp_ps(d, best[p], _CMP_LT_OQ) : all;
        best[p] = _mm256_blendv_ps(best[p], d, lt);
        arg[p] = _mm256_blendv_ps(arg[p], jf, lt);
      }
    }
    for (int p = 0; p < P_; ++p) {
      _mm256_storeu_ps(m_next[p] + u, best[p]);
      store_bytes(back[p] + u, _mm256_cvttps_epi32(arg[p]));
    }
  }
}

void step(const Trellis& P, int n, const float* const* x_t, float* const* m,
          float* const* m_next, uint8_t* const* back) {
  const int64_t G = int64_t{1} << (P.L - P.kV);
  if (G % 8) {
    for (int p = 0; p < n; ++p) step_scalar(P, x_t[p], m[p], m_next[p], back[p]);
    return;
  }
  switch (n) {
    case 1: return step_many<1>(P, x_t, m, m_next, back);
    case 2: return step_many<2>(P, x_t, m, m_next, back);
    case 3: return step_many<3>(P, x_t, m, m_next, back);
    default: return step_many<4>(P, x_t, m, m_next, back);
  }
}
#else
void step(const Trellis& P, int n, const float* const* x_t, float* const* m,
          float* const* m_next, uint8_t* const* back) {
  for (int p = 0; p < n; ++p) step_scalar(P, x_t[p], m[p], m_next[p], back[p]);
}
#endif

constexpr int kLockStep = 4;  // sequences a thread walks together

struct Walks {  // one thread's buffers for kLockStep sequences
  std::vector<float> m, m_next;
  std::vector<uint8_t> back;
  Walks(int64_t G, int T) : m(kLockStep * G), m_next(kLockStep * G), back(kLockStep * T * G) {}
};

// The end of a walk: the best final state (low L − kV bits = overlap when constrained), then
// the back-pointers.
void backtrack(const Trellis& P, const float* x, int64_t overlap, const float* m,
               const uint8_t* back, int64_t* out) {
  const int64_t S = int64_t{1} << P.L, G = int64_t{1} << (P.L - P.kV);
  const float* xT = x + (P.T - 1) * P.V;
  int64_t best = -1;
  float best_d = 0.f;
  for (int64_t s = 0; s < S; ++s) {
    if (overlap >= 0 && (s & (G - 1)) != overlap) continue;
    const float d = m[s >> P.kV] + cost(P, xT, s);
    if (best < 0 || d < best_d) best = s, best_d = d;
  }
  out[P.T - 1] = best;
  for (int t = P.T - 1; t > 0; --t) {
    const int64_t u = out[t] >> P.kV;
    out[t - 1] = (int64_t(back[int64_t(t) * G + u]) << (P.L - P.kV)) | u;
  }
}

// n <= kLockStep sequences x[p] (T·V floats each). m_0 = 0 for the allowed start groups
// (top L − kV bits of the first state = overlap), +inf elsewhere.
void viterbi_many(const Trellis& P, int n, const float* const* x, const int64_t* overlap,
                  Walks& w, int64_t* const* out) {
  const int64_t G = int64_t{1} << (P.L - P.kV);
  const float inf = std::numeric_limits<float>::infinity();
  const float* xt[kLockStep];
  float *m[kLockStep], *m_next[kLockStep];
  uint8_t* back[kLockStep];
  for (int p = 0; p < n; ++p) {
    m[p] = w.m.data() + p * G, m_next[p] = w.m_next.data() + p * G;
    for (int64_t u = 0; u < G; ++u) m[p][u] = overlap[p] < 0 || u == overlap[p] ? 0.f : inf;
  }
  for (int t = 0; t + 1 < P.T; ++t) {
    for (int p = 0; p < n; ++p)
      xt[p] = x[p] + t * P.V, back[p] = w.back.data() + (int64_t(p) * P.T + t + 1) * G;
    step(P, n, xt, m, m_next, back);
    for (int p = 0; p < n; ++p) std::swap(m[p], m_next[p]);
  }
  for (int p = 0; p < n; ++p)
    backtrack(P, x[p], overlap[p], m[p], w.back.data() + int64_t(p) * P.T * G, out[p]);
}

at::Tensor viterbi_cpu(const at::Tensor& x, const at::Tensor& values, int64_t L, int64_t kV,
                       const std::optional<at::Tensor>& overlap) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat, "x must be [B, T, V] float32");
  TORCH_CHECK(values.dim() == 2 && values.scalar_type() == at::kFloat &&
                  values.size(1) == (int64_t{1} << L) && values.size(0) == x.size(2),
              "values must be [V, 2^L] float32");
  TORCH_CHECK(kV >= 1 && kV <= 8 && kV < L && L <= 24, "need 1 <= kV <= 8, kV < L <= 24");
  const auto xc = x.contiguous();
  const auto vc = values.contiguous();
  const int64_t B = x.size(0);
  const Trellis P{int(L), int(kV), int(x.size(2)), int(x.size(1)), vc.data_ptr<float>()};
  auto out = at::empty({B, P.T}, x.options().dtype(at::kLong));
  const int64_t* ov = nullptr;
  at::Tensor oc;
  if (overlap) {
    oc = overlap->to(at::kLong).contiguous();
    TORCH_CHECK(oc.numel() == B, "overlap must hold one value per sequence");
    ov = oc.data_ptr<int64_t>();
  }
  const int64_t G = int64_t{1} << (L - kV);
  at::parallel_for(0, (B + kLockStep - 1) / kLockStep, 1, [&](int64_t g0, int64_t g1) {
    Walks w(G, P.T);
    for (int64_t g = g0; g < g1; ++g) {
      const int n = int(std::min<int64_t>(kLockStep, B - g * kLockStep));
      const float* x[kLockStep];
      int64_t ovl[kLockStep];
      int64_t* o[kLockStep];
      for (int p = 0; p < n; ++p) {
        const int64_t b = g * kLockStep + p;
        x[p] = xc.data_ptr<float>() + b * P.T * P.V;
        ovl[p] = ov ? ov[b] : -1;
        o[p] = out.data_ptr<int64_t>() + b * P.T;
      }
      viterbi_many(P, n, x, ovl, w, o);
    }
  });
  return out;
}

// ---- decode and multiply -------------------------------------------------------------------

using discq_trellis::Code;
using discq_trellis::Coding;
using discq_trellis::kHyb;
using discq_trellis::kOneMad;
using discq_trellis::kThreeInst;

inline float fp16_bits(uint32_t h) { return c10::detail::fp16_ieee_to_fp32_value(uint16_t(h)); }

// The tile's 256 weights (row-major) from its bitstream of 8·bits words.
void decode_tile(const Coding& C, const int32_t* words, float* w) {
  const int kV = C.bits * C.V, n_bits = kTileSize * C.bits, W = n_bits / 32;
  const int T = kTileSize / C.V;
  for (int t = 0; t < T; ++t) {
    const int start = ((t + 1) * kV - C.L + n_bits) % n_bits;
    const int i = start >> 5;
    const uint64_t pair = (uint64_t(uint32_t(words[i])) << 32) | uint32_t(words[(i + 1) % W]);
    const uint32_t s = uint32_t(pair >> (64 - C.L - (start & 31))) & ((1u << C.L) - 1);
    if (C.code == kOneMad) {
      const uint32_t x = 34038481u * s + 76625530u;
      const uint32_t pairs = (x & 0x00FF00FFu) + ((x >> 8) & 0x00FF00FFu);
      w[t] = (float(int((pairs & 0xFFFFu) + (pairs >> 16)) - 510)) / 147.8f;
    } else if (C.code == kThreeInst) {
      const uint32_t x = ((89226354u * s + 64248484u) & 0x8FFF8FFFu) ^ 0x3B603B60u;
      w[t] = fp16_bits(x & 0xFFFFu) + fp16_bits(x >> 16);
    } else {
      const uint32_t h = s * (s + 1);
      const float* row = C.lut + 2 * ((h >> (15 - C.Q)) & ((1u << C.Q) - 1));
      w[2 * t] = (h >> 15) & 1 ? -row[0] : row[0];
      w[2 * t + 1] = row[1];
    }
  }
}

// Above this many activation rows, decoding the weight once and one GEMM beat decoding it in
// registers once per four rows.
constexpr int64_t kFusedRows = 16;

// The unscaled coded matrix [N, K] fp32 (the prefill's and evaluation's path).
at::Tensor decode_weight(const Coding& C, const at::Tensor& qdata) {
  const int64_t NT = qdata.size(0), KT = qdata.size(1), Wt = qdata.size(2);
  auto W = at::empty({NT * kTile, KT * kTile}, qdata.options().dtype(at::kFloat));
  float* out = W.data_ptr<float>();
  at::parallel_for(0, NT * KT, 16, [&](int64_t t0, int64_t t1) {
    float w[kTileSize];
    for (int64_t t = t0; t < t1; ++t) {
      decode_tile(C, qdata.data_ptr<int32_t>() + t * Wt, w);
      const int64_t i = t / KT, j = t % KT;
      for (int a = 0; a < kTile; ++a)
        std::memcpy(out + (i * kTile + a) * KT * kTile + j * kTile, w + a * kTile,
                    kTile * sizeof(float));
    }
  });
  return W;
}

// HYB's table as fp16 bits when fp16 holds it exactly (the lane kernel gathers fp16 pairs);
// nothing otherwise, or for the computed codes.
std::optional<std::vector<uint16_t>> fp16_table(const std::optional<at::Tensor>& lut) {
  if (!lut) return std::nullopt;
  const auto t = lut->contiguous();
  std::vector<uint16_t> out(t.numel());
  if (t.scalar_type() == at::kHalf) {  // as stored: its bits
    std::memcpy(out.data(), t.data_ptr<at::Half>(), out.size() * sizeof(uint16_t));
    return out;
  }
  const auto v = t.to(at::kFloat);
  for (size_t i = 0; i < out.size(); ++i) {
    out[i] = c10::detail::fp16_ieee_from_fp32_value(v.data_ptr<float>()[i]);
    if (fp16_bits(out[i]) != v.data_ptr<float>()[i]) return std::nullopt;
  }
  return out;
}

at::Tensor trellis_linear_cpu(const at::Tensor& x, const at::Tensor& qdata,
                              const std::optional<at::Tensor>& lut, int64_t bits,
                              const std::string& code, int64_t L) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be [M, K] float32");
  TORCH_CHECK(qdata.dim() == 3 && qdata.scalar_type() == at::kInt &&
                  qdata.size(2) == kTileSize * bits / 32 && x.size(1) == qdata.size(1) * kTile,
              "qdata must be [N/16, K/16, 8*bits] int32 matching x");
  TORCH_CHECK(L >= 8 && L <= 16, "trellis states have 8 to 16 bits");
  Coding C{kOneMad, int(bits), 1, 0, int(L), nullptr};
  if (code == "3inst") {
    C.code = kThreeInst;
  } else if (code == "hyb") {
    TORCH_CHECK(lut.has_value() && lut->dim() == 2 && lut->size(1) == 2,
                "the HYB code needs its table [2^Q, 2]");
    C = Coding{kHyb, int(bits), 2, int(63 - __builtin_clzll(uint64_t(lut->size(0)))), int(L),
               nullptr};
  } else {
    TORCH_CHECK(code == "1mad", "unknown trellis code ", code);
  }
  const auto xc = x.contiguous();
  const auto qc = qdata.contiguous();
  const int64_t M = x.size(0), K = x.size(1), NT = qdata.size(0), KT = qdata.size(1);
  const int64_t Wt = qdata.size(2);
  at::Tensor lc;  // the scalar decode reads HYB's table as fp32
  if (C.code == kHyb) lc = lut->to(at::kFloat).contiguous(), C.lut = lc.data_ptr<float>();
  if (M > kFusedRows) return at::mm(xc, decode_weight(C, qc).t());  // decode once, then GEMM
  auto y = at::zeros({M, NT * kTile}, x.options());
  const float* X = xc.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const auto half = C.code == kHyb ? fp16_table(lut) : std::nullopt;  // the lanes gather fp16
  if (discq_trellis::linear_lanes(C, half ? half->data() : nullptr, X, qc.data_ptr<int32_t>(),
                                  Y, M, K, NT, KT))
    return y;
  at::parallel_for(0, NT, 1, [&](int64_t i0, int64_t i1) {
    float w[kTileSize];
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t j = 0; j < KT; ++j) {
        decode_tile(C, qc.data_ptr<int32_t>() + (i * KT + j) * Wt, w);
        for (int64_t r = 0; r < M; ++r) {
          const float* xr = X + r * K + j * kTile;
          float* yr = Y + r * NT * kTile + i * kTile;
          for (int a = 0; a < kTile; ++a) {
            float acc = 0.f;
#pragma omp simd reduction(+ : acc)
            for (int c = 0; c < kTile; ++c) acc += w[a * kTile + c] * xr[c];
            yr[a] += acc;
          }
        }
      }
  });
  return y;
}

at::Tensor qtip_linear_cpu(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scale,
                           const at::Tensor& s_in, const at::Tensor& s_out,
                           const at::Tensor& q_in, const at::Tensor& q_out,
                           const std::optional<at::Tensor>& lut,
                           const std::optional<at::Tensor>& bias, int64_t bits,
                           const std::string& code, int64_t L) {
  return discq_hadamard::rotated_linear(
      x, qdata.size(0) * kTile, scale, s_in, s_out, q_in, q_out, bias,
      [&](const at::Tensor& xr) { return trellis_linear_cpu(xr, qdata, lut, bits, code, L); });
}

}  // namespace

TORCH_LIBRARY_IMPL(discq, CPU, m) {
  m.impl("viterbi_cpu", &viterbi_cpu);
  m.impl("trellis_linear_cpu", &trellis_linear_cpu);
  m.impl("qtip_linear_cpu", &qtip_linear_cpu);
}
