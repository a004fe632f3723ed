// y = x Ŵᵀ + b for the packed affine grid on CPU. Up to GEMM_ROWS activation rows (decode, short
// prefill) a fused unpack-dequantize-multiply that never writes Ŵ; above, Ŵ is dequantized once
// (vectorized) and one fp32 GEMM runs.
//
// Layout (tensors/packing.py): each weight row is runs of 8 codes; a run of b-bit codes is the
// b-byte little-endian word Σ c_i << (b·i) (8-bit codes: one byte each). Scales and zero points
// are per (row, group) with input grouping: scale, zero: [N, G].
//
// Why the fused path is fast: per group we accumulate Σ q·x with the integer codes turned into floats in
// registers (broadcast the word, shift each lane by b·i, mask, convert), then fold the group in
// with one FMA by its scale; the zero point costs one scalar per group, z·s·Σx, with Σx per
// group computed once per call. The weight is read once at b bits instead of 32. For one
// activation row (decode) four output rows are done together: one load of x serves four rows
// and their four FMA chains hide each other's latency.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Half.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cstring>
#include <optional>
#include <type_traits>
#include <utility>

#include "shares.h"
#include "simd.h"

namespace {

constexpr int RUN = 8;   // codes per packed run
constexpr int MB = 4;    // activation rows per register block

// Bytes of one packed run.
template <int BITS>
constexpr int run_bytes() { return BITS == 8 ? RUN : BITS; }

// The BITS-byte little-endian word of one run of 2/3/4-bit codes. Whole loads only: a
// 3-byte memcpy becomes a library call, and reading 4 bytes could run past the tensor's end.
template <int BITS>
inline uint32_t load_word(const uint8_t* p) {
  if constexpr (BITS == 2) {
    uint16_t w;
    std::memcpy(&w, p, 2);
    return w;
  } else if constexpr (BITS == 3) {
    uint16_t lo;
    std::memcpy(&lo, p, 2);
    return lo | (static_cast<uint32_t>(p[2]) << 16);
  } else {
    uint32_t w;
    std::memcpy(&w, p, 4);
    return w;
  }
}

// The 8 codes of one run as floats.
#ifdef DISCQ_AVX2
template <int BITS>
inline __m256 decode_run(const uint8_t* p) {
  if constexpr (BITS == 8) {
    __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
  } else {
    const uint32_t w = load_word<BITS>(p);
    const __m256i shifts = _mm256_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS,
                                             6 * BITS, 7 * BITS);
    const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
    __m256i v = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(w)), shifts);
    return _mm256_cvtepi32_ps(_mm256_and_si256(v, mask));
  }
}

// Two consecutive runs (2·BITS bytes) as floats, with whole in-bounds loads broadcast straight
// from memory: 2-bit runs share one 4-byte word; a 3-bit pair is read as the words at bytes 0
// and 2 (the second run starts at bit 8 of the second word).
template <int BITS>
inline void decode_pair(const uint8_t* p, __m256& a, __m256& b) {
  if constexpr (BITS == 2 || BITS == 3) {
    constexpr int OFF = BITS == 2 ? 0 : 2, SH = BITS == 2 ? 16 : 8;
    int32_t w0, w1;
    std::memcpy(&w0, p, 4);
    std::memcpy(&w1, p + OFF, 4);
    const __m256i s0 = _mm256_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS,
                                         6 * BITS, 7 * BITS);
    const __m256i s1 = _mm256_add_epi32(s0, _mm256_set1_epi32(SH));
    const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
    a = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(w0), s0), mask));
    b = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(w1), s1), mask));
  } else {
    a = decode_run<BITS>(p);
    b = decode_run<BITS>(p + run_bytes<BITS>());
  }
}

using discq_simd::hsum;
#endif

template <int BITS>
inline void decode_run_scalar(const uint8_t* p, float* q) {
  if constexpr (BITS == 8) {
    for (int i = 0; i < RUN; ++i) q[i] = static_cast<float>(p[i]);
  } else {
    const uint32_t w = load_word<BITS>(p);
    for (int i = 0; i < RUN; ++i) q[i] = static_cast<float>((w >> (BITS * i)) & ((1u << BITS) - 1));
  }
}

struct Problem {
  const float* x;        // [M, Kp] activations, zero-padded to whole runs
  const float* xsum;     // [M, G] Σx per group
  const uint8_t* qdata;  // [N, Wb] packed codes
  const uint8_t* zero;   // [N, G] or nullptr (symmetric: zero = 2^(b-1))
  const float* bias;     // [N] or nullptr
  float* y;              // [M, N] (the GEMV path) or W: [N, Kp] (the dequantize path)
  int64_t M, N, Kp, G, Wb, runs_per_group;
};

#ifdef DISCQ_AVX2
// Σ_r q_r · x[m]_r over runs r0..r0+R of one row, for MT activation rows at once. U independent
// accumulators per activation row hide the FMA latency when MT is small.
template <int BITS, int MT>
inline void group_dot(const Problem& P, const uint8_t* row, int64_t m0, int64_t r0, int64_t R,
                      __m256 (&out)[MT]) {
  constexpr int U = MT == 1 ? 4 : (MT == 2 ? 2 : 1);
  __m256 acc[MT][U];
  for (int m = 0; m < MT; ++m)
    for (int u = 0; u < U; ++u) acc[m][u] = _mm256_setzero_ps();
  const float* x = P.x + m0 * P.Kp + r0 * RUN;
  const uint8_t* w = row + r0 * run_bytes<BITS>();
  int64_t r = 0;
  for (; (BITS == 2 || BITS == 3) && r + 2 <= R; r += 2) {  // see decode_pair
    __m256 q0, q1;
    decode_pair<BITS>(w + r * run_bytes<BITS>(), q0, q1);
    for (int m = 0; m < MT; ++m) {
      acc[m][0] = _mm256_fmadd_ps(q0, _mm256_loadu_ps(x + m * P.Kp + r * RUN), acc[m][0]);
      acc[m][U - 1] = _mm256_fmadd_ps(q1, _mm256_loadu_ps(x + m * P.Kp + (r + 1) * RUN),
                                      acc[m][U - 1]);
    }
  }
  for (; r + U <= R; r += U)
    for (int u = 0; u < U; ++u) {
      const __m256 q = decode_run<BITS>(w + (r + u) * run_bytes<BITS>());
      for (int m = 0; m < MT; ++m)
        acc[m][u] = _mm256_fmadd_ps(q, _mm256_loadu_ps(x + m * P.Kp + (r + u) * RUN), acc[m][u]);
    }
  for (; r < R; ++r) {
    const __m256 q = decode_run<BITS>(w + r * run_bytes<BITS>());
    for (int m = 0; m < MT; ++m)
      acc[m][0] = _mm256_fmadd_ps(q, _mm256_loadu_ps(x + m * P.Kp + r * RUN), acc[m][0]);
  }
  for (int m = 0; m < MT; ++m) {
    __m256 a = acc[m][0];
    for (int u = 1; u < U; ++u) a = _mm256_add_ps(a, acc[m][u]);
    out[m] = a;
  }
}
#endif

// Scale and zero point of group g of row n.
template <int BITS, typename S>
inline std::pair<float, float> group_params(const Problem& P, const S* scale, int64_t n,
                                            int64_t g) {
  const float z = P.zero ? static_cast<float>(P.zero[n * P.G + g])
                         : static_cast<float>(1 << (BITS - 1));
  return {static_cast<float>(scale[n * P.G + g]), z};
}

#ifdef DISCQ_AVX2
// acc[m] += s_g · Σ q x over group g; zterm[m] += s_g · z_g · Σx over group g.
template <int BITS, int MT, typename S>
inline void fold_group(const Problem& P, const S* scale, const uint8_t* row, int64_t n,
                       int64_t g, int64_t m0, __m256 (&acc)[MT], float (&zterm)[MT]) {
  const int64_t r0 = g * P.runs_per_group;
  const int64_t r1 = std::min(P.Kp / RUN, r0 + P.runs_per_group);
  const auto [s, z] = group_params<BITS>(P, scale, n, g);
  __m256 dot[MT];
  group_dot<BITS, MT>(P, row, m0, r0, r1 - r0, dot);
  const __m256 sv = _mm256_set1_ps(s);
  for (int m = 0; m < MT; ++m) {
    acc[m] = _mm256_fmadd_ps(dot[m], sv, acc[m]);
    zterm[m] += s * z * P.xsum[(m0 + m) * P.G + g];
  }
}

// y[m0..m0+MT, n] for output channels n0..n1. S: the scale's storage type.
template <int BITS, int MT, typename S>
void block(const Problem& P, const S* scale, int64_t m0, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = P.qdata + n * P.Wb;
    __m256 acc[MT];
    float zterm[MT] = {};
    for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < P.G; ++g) fold_group<BITS, MT>(P, scale, row, n, g, m0, acc, zterm);
    for (int m = 0; m < MT; ++m) {
      const float v = hsum(acc[m]) - zterm[m];
      P.y[(m0 + m) * P.N + n] = P.bias ? v + P.bias[n] : v;
    }
  }
}

// Σ_r q_r · x_r over runs r0..r1 for NR consecutive weight rows (one activation row): one load
// of x serves NR rows, whose NR independent FMA chains hide each other's latency.
template <int BITS, int NR>
inline void rows_dot(const float* x, const uint8_t* row, int64_t Wb, int64_t r0, int64_t r1,
                     __m256 (&acc)[NR]) {
  constexpr int RB = run_bytes<BITS>();
  for (int j = 0; j < NR; ++j) acc[j] = _mm256_setzero_ps();
  int64_t r = r0;
  for (; (BITS == 2 || BITS == 3) && r + 2 <= r1; r += 2) {  // see decode_pair
    const __m256 x0 = _mm256_loadu_ps(x + r * RUN), x1 = _mm256_loadu_ps(x + r * RUN + RUN);
    for (int j = 0; j < NR; ++j) {
      __m256 q0, q1;
      decode_pair<BITS>(row + j * Wb + r * RB, q0, q1);
      acc[j] = _mm256_fmadd_ps(q1, x1, _mm256_fmadd_ps(q0, x0, acc[j]));
    }
  }
  for (; r < r1; ++r) {
    const __m256 xv = _mm256_loadu_ps(x + r * RUN);
    for (int j = 0; j < NR; ++j)
      acc[j] = _mm256_fmadd_ps(decode_run<BITS>(row + j * Wb + r * RB), xv, acc[j]);
  }
}

// y[m0, n0..n1] for one activation row (decode), four output rows at a time (measured against
// one row at a time with split accumulators: 1.2-1.4x faster on SmolLM2's shapes).
template <int BITS, typename S>
void gemv_rows(const Problem& P, const S* scale, int64_t m0, int64_t n0, int64_t n1) {
  constexpr int NR = 4;
  const float* x = P.x + m0 * P.Kp;
  const float* xs = P.xsum + m0 * P.G;
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) {
    __m256 tot[NR], acc[NR];
    float zt[NR] = {};
    for (int j = 0; j < NR; ++j) tot[j] = _mm256_setzero_ps();
    for (int64_t g = 0; g < P.G; ++g) {
      const int64_t r0 = g * P.runs_per_group;
      // fetch the next block's rows one block ahead: four interleaved row streams of a few
      // cache lines each are too short for the hardware prefetcher (measured: 4-bit 576x1536
      // with weights from memory, 150 -> 88 us)
      if (n + 2 * NR <= n1)
        for (int j = 0; j < NR; ++j)
          _mm_prefetch(reinterpret_cast<const char*>(P.qdata + (n + NR + j) * P.Wb +
                                                     r0 * run_bytes<BITS>()), _MM_HINT_T0);
      rows_dot<BITS, NR>(x, P.qdata + n * P.Wb, P.Wb, r0,
                         std::min(P.Kp / RUN, r0 + P.runs_per_group), acc);
      for (int j = 0; j < NR; ++j) {
        const auto [s, z] = group_params<BITS>(P, scale, n + j, g);
        tot[j] = _mm256_fmadd_ps(acc[j], _mm256_set1_ps(s), tot[j]);
        zt[j] += s * z * xs[g];
      }
    }
    for (int j = 0; j < NR; ++j) {
      const float v = hsum(tot[j]) - zt[j];
      P.y[m0 * P.N + n + j] = P.bias ? v + P.bias[n + j] : v;
    }
  }
  if (n < n1) block<BITS, 1, S>(P, scale, m0, n, n1);  // the last n1 - n < 4 rows
}
#else
// Portable fallback (no AVX2/FMA): the same sums, one code at a time.
template <int BITS, int MT, typename S>
void block(const Problem& P, const S* scale, int64_t m0, int64_t n0, int64_t n1) {
  const int64_t runs = P.Kp / RUN;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = P.qdata + n * P.Wb;
    float acc[MT] = {};
    for (int64_t g = 0; g < P.G; ++g) {
      const auto [s, z] = group_params<BITS>(P, scale, n, g);
      float q[RUN];
      for (int64_t r = g * P.runs_per_group; r < std::min(runs, (g + 1) * P.runs_per_group); ++r) {
        decode_run_scalar<BITS>(row + r * run_bytes<BITS>(), q);
        for (int m = 0; m < MT; ++m)
          for (int i = 0; i < RUN; ++i) acc[m] += s * q[i] * P.x[(m0 + m) * P.Kp + r * RUN + i];
      }
      for (int m = 0; m < MT; ++m) acc[m] -= s * z * P.xsum[(m0 + m) * P.G + g];
    }
    for (int m = 0; m < MT; ++m)
      P.y[(m0 + m) * P.N + n] = P.bias ? acc[m] + P.bias[n] : acc[m];
  }
}

template <int BITS, typename S>
void gemv_rows(const Problem& P, const S* scale, int64_t m0, int64_t n0, int64_t n1) {
  block<BITS, 1, S>(P, scale, m0, n0, n1);
}
#endif

// Rows of Ŵ as fp32 into P.y viewed as W: [N, Kp] (padding codes dequantize to -z·s, which
// meets zero-padded x). Written once per call and read by one GEMM.
template <int BITS, typename S>
void dequantize_rows(const Problem& P, const S* scale, int64_t n0, int64_t n1) {
  const int64_t runs = P.Kp / RUN;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = P.qdata + n * P.Wb;
    float* W = P.y + n * P.Kp;
    for (int64_t g = 0; g < P.G; ++g) {
      const auto [s, z] = group_params<BITS>(P, scale, n, g);
      for (int64_t r = g * P.runs_per_group; r < std::min(runs, (g + 1) * P.runs_per_group); ++r) {
#ifdef DISCQ_AVX2
        const __m256 q = decode_run<BITS>(row + r * run_bytes<BITS>());
        _mm256_storeu_ps(W + r * RUN, _mm256_mul_ps(_mm256_sub_ps(q, _mm256_set1_ps(z)),
                                                    _mm256_set1_ps(s)));
#else
        float q[RUN];
        decode_run_scalar<BITS>(row + r * run_bytes<BITS>(), q);
        for (int i = 0; i < RUN; ++i) W[r * RUN + i] = (q[i] - z) * s;
#endif
      }
    }
  }
}

// Above this many activation rows, dequantize once and run one fp32 GEMM: measured here
// (AVX2, 2 cores) the fused kernel still wins at 64 rows on 1536x576 and 4096x4096 and loses
// at 128 rows on 1536x576, where the GEMM's compute density takes over.
constexpr int64_t GEMM_ROWS = 64;

template <int BITS, typename S>
void products(const Problem& P, const S* scale, int64_t n0, int64_t n1) {
  int64_t m0 = 0;
  for (; m0 + MB <= P.M; m0 += MB) block<BITS, MB, S>(P, scale, m0, n0, n1);
  switch (P.M - m0) {  // compile-time row counts keep the accumulators in registers
    case 3: block<BITS, 3, S>(P, scale, m0, n0, n1); break;
    case 2: block<BITS, 2, S>(P, scale, m0, n0, n1); break;
    case 1: gemv_rows<BITS, S>(P, scale, m0, n0, n1); break;
    default: break;
  }
}

template <int BITS, typename S>
void run(const Problem& P, const S* scale, bool dequantize) {
  if (dequantize)  // one long pass before a GEMM: equal parts, ~64 rows per task at least
    return at::parallel_for(0, P.N, 64, [&](int64_t n0, int64_t n1) {
      dequantize_rows<BITS, S>(P, scale, n0, n1);
    });
  discq_shares::for_chunks(P.N, 32, 64, [&](int64_t n0, int64_t n1) {
    products<BITS, S>(P, scale, n0, n1);
  });
}

template <typename S>
void dispatch_bits(int64_t bits, const Problem& P, const S* scale, bool dequantize) {
  switch (bits) {
    case 2: return run<2, S>(P, scale, dequantize);
    case 3: return run<3, S>(P, scale, dequantize);
    case 4: return run<4, S>(P, scale, dequantize);
    case 8: return run<8, S>(P, scale, dequantize);
    default: TORCH_CHECK(false, "discq::affine_linear_cpu: bits must be 2, 3, 4 or 8, got ", bits);
  }
}

// Activations as fp32 [M, Kp] (zero-padded to whole runs: padding codes are 0, but padding x must
// be finite) and, for the fused path, Σx per group [M, G].
std::pair<at::Tensor, at::Tensor> prepare_x(const at::Tensor& x, int64_t Kp, int64_t G,
                                            int64_t group_size, bool with_sums) {
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor xf;
  if (Kp == K && x.scalar_type() == at::kFloat && x.is_contiguous()) {
    xf = x;
  } else {
    xf = at::zeros({M, Kp}, x.options().dtype(at::kFloat));
    xf.narrow(1, 0, K).copy_(x);
  }
  at::Tensor xsum = at::empty({with_sums ? M : 0, G}, xf.options());
  const float* xp = xf.data_ptr<float>();
  float* sp = xsum.data_ptr<float>();
  for (int64_t m = 0; m < xsum.size(0); ++m)
    for (int64_t g = 0; g < G; ++g) {
      float a = 0;
      for (int64_t k = g * group_size; k < std::min(Kp, (g + 1) * group_size); ++k)
        a += xp[m * Kp + k];
      sp[m * G + g] = a;
    }
  return {xf, xsum};
}

// x: [M, K] -> y: [M, N] in x's dtype.
at::Tensor affine_linear_cpu(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scale,
                           const std::optional<at::Tensor>& zero_point,
                           const std::optional<at::Tensor>& bias, int64_t bits,
                           int64_t group_size, int64_t in_features) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == in_features, "x must be [M, in_features]");
  TORCH_CHECK(qdata.scalar_type() == at::kByte && qdata.dim() == 2, "qdata must be 2-D uint8");
  TORCH_CHECK(group_size > 0 && group_size % RUN == 0, "group_size must be a multiple of 8");
  const int64_t M = x.size(0), N = qdata.size(0), K = in_features;
  const int64_t G = (K + group_size - 1) / group_size, Kp = (K + RUN - 1) / RUN * RUN;
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == N && scale.size(1) == G, "scale must be [N, G]");
  // 8-bit rows are not padded to whole runs (packing.py), so they must hold whole runs here
  TORCH_CHECK(bits != 8 || K % RUN == 0, "8-bit codes need in_features % 8 == 0");
  const int64_t Wb = bits == 8 ? K : Kp / RUN * bits;
  TORCH_CHECK(qdata.size(1) >= Wb, "qdata is narrower than the packed rows");
  const bool dequantize = M > GEMM_ROWS;
  auto [xf, xsum] = prepare_x(x, Kp, G, group_size, !dequantize);
  at::Tensor q = qdata.contiguous(), s = scale.contiguous();
  at::Tensor z, b;
  if (zero_point) {
    TORCH_CHECK(zero_point->scalar_type() == at::kByte && zero_point->sizes() == scale.sizes(),
                "zero_point must be uint8 shaped like scale");
    z = zero_point->contiguous();
  }
  if (bias) b = bias->to(at::kFloat).contiguous();
  at::Tensor y = dequantize ? at::empty({N, Kp}, xf.options()) : at::empty({M, N}, xf.options());
  Problem P{xf.data_ptr<float>(), xsum.data_ptr<float>(), q.data_ptr<uint8_t>(),
            z.defined() ? z.data_ptr<uint8_t>() : nullptr,
            b.defined() ? b.data_ptr<float>() : nullptr, y.data_ptr<float>(),
            M, N, Kp, G, q.size(1), group_size / RUN};
  switch (s.scalar_type()) {
    case at::kFloat: dispatch_bits(bits, P, s.data_ptr<float>(), dequantize); break;
    case at::kHalf: dispatch_bits(bits, P, s.data_ptr<c10::Half>(), dequantize); break;
    case at::kBFloat16: dispatch_bits(bits, P, s.data_ptr<c10::BFloat16>(), dequantize); break;
    default: TORCH_CHECK(false, "scale must be float32, float16 or bfloat16");
  }
  if (dequantize)  // y held W: [N, Kp]
    y = b.defined() ? at::addmm(b, xf, y.t()) : at::mm(xf, y.t());
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(discq, CPU, m) {
  m.impl("affine_linear_cpu", &affine_linear_cpu);
}
