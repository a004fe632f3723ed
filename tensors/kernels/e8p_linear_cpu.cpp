// discq::e8p_linear_cpu: QuIP#'s 2-bit linear (E8P codes, tensors/e8p.py; the layout of
// kernels/e8p_ref.py) in one call: the input's randomized Hadamard transform, y = x Ŵᵀ decoding
// each 16-bit code into its 8 weights in a register (up to 16 rows; above, the weight is
// decoded once and multiplied by one GEMM), the scale, the output's inverse transform and the
// bias; x [..., K] in any float type.
//
// A code c is pattern a = c & 0xFF (its low byte), signs of coordinates 0–6 in bits 8–14 (the
// last sign is the one that makes the point's coordinate sum even: popcount of the seven ⊕ the
// pattern's parity) and the shift ±¼ in bit 15. Its weights are (|pattern a| with the sign bits
// flipped) + shift: the high byte and a's parity index one 64-byte row of sign masks and shift,
// the low byte a row of magnitudes; one xor, one add, then one FMA with x's 8 entries. The
// tables (40 KiB) stay in L1/L2; the codes stream once. Per code that is a few scalar
// operations (the scalar decode of the bits measured slower than the vector work) and four
// vector loads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <vector>

#include "hadamard_cpu.h"
#include "shares.h"
#include "simd.h"

namespace {

constexpr int kRows = 4;  // activation rows a pass keeps in registers

struct Tables {
  alignas(32) float mag[256][8];
  // by (code >> 8) | parity << 8: the 8 coordinates' sign masks, then the shift ±¼ in 8 lanes
  // (one row of 64 bytes: what a code needs besides its magnitudes)
  alignas(64) uint32_t sign_shift[512][16];
  uint16_t parity[256];  // Σ|pattern| mod 2, times 256
};

Tables make_tables(const float* patterns) {
  Tables T;
  for (int a = 0; a < 256; ++a) {
    float sum = 0.f;
    for (int i = 0; i < 8; ++i) T.mag[a][i] = patterns[a * 8 + i], sum += patterns[a * 8 + i];
    T.parity[a] = uint16_t((std::lround(sum) & 1) << 8);
  }
  for (int idx = 0; idx < 512; ++idx) {
    const int t = idx & 0x7F, shift = (idx >> 7) & 1, parity = idx >> 8;
    const int sb = t | (((__builtin_popcount(t) ^ parity) & 1) << 7);  // Σx even
    const float sh = shift ? -0.25f : 0.25f;
    for (int i = 0; i < 8; ++i) {
      T.sign_shift[idx][i] = (sb >> i) & 1 ? 0x80000000u : 0u;
      std::memcpy(&T.sign_shift[idx][8 + i], &sh, 4);
    }
  }
  return T;
}

// weight i of the code whose bytes are c[0], c[1] (the portable loop's and the decode's)
inline float code_weight(const Tables& T, const uint8_t* c, int i) {
  const uint32_t* row = T.sign_shift[c[1] | T.parity[c[0]]];
  float shift;
  std::memcpy(&shift, row + 8 + i, 4);
  return (row[i] ? -T.mag[c[0]][i] : T.mag[c[0]][i]) + shift;
}

#ifdef DISCQ_AVX2
// the 8 weights of the code whose bytes are c[0], c[1]
inline __m256 weights(const Tables& T, const uint8_t* c) {
  const uint32_t* row = T.sign_shift[c[1] | T.parity[c[0]]];
  const __m256 sgn = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(row)));
  const __m256 shift = _mm256_load_ps(reinterpret_cast<const float*>(row + 8));
  return _mm256_add_ps(_mm256_xor_ps(_mm256_load_ps(T.mag[c[0]]), sgn), shift);
}
#endif

// y[m, n] = Σ_b w(code[n, b]) · x[m, 8b..8b+7] for R rows, output rows [n0, n1)
template <int R>
void rows_of(const Tables& T, const uint8_t* codes, int64_t B, const float* X, int64_t K,
             float* Y, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* c = codes + n * 2 * B;  // little-endian 16-bit codes
    float out[R];
#ifdef DISCQ_AVX2
    __m256 acc[R][2];  // two chains a row: the FMA's latency, not its rate, would bound one
    for (int m = 0; m < R; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 1 < B; b += 2) {
      const __m256 w0 = weights(T, c + 2 * b), w1 = weights(T, c + 2 * b + 2);
      for (int m = 0; m < R; ++m) {
        acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(X + m * K + 8 * b), acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(X + m * K + 8 * b + 8), acc[m][1]);
      }
    }
    if (b < B) {
      const __m256 w0 = weights(T, c + 2 * b);
      for (int m = 0; m < R; ++m)
        acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(X + m * K + 8 * b), acc[m][0]);
    }
    for (int m = 0; m < R; ++m) out[m] = discq_simd::hsum(_mm256_add_ps(acc[m][0], acc[m][1]));
#else
    for (int m = 0; m < R; ++m) out[m] = 0.f;
    for (int64_t b = 0; b < B; ++b)
      for (int i = 0; i < 8; ++i) {
        const float w = code_weight(T, c + 2 * b, i);
        for (int m = 0; m < R; ++m) out[m] += w * X[m * K + 8 * b + i];
      }
#endif
    for (int m = 0; m < R; ++m) Y[m * N + n] = out[m];
  }
}

void product(const Tables& T, const uint8_t* codes, const float* X, float* Y, int64_t M,
             int64_t K, int64_t N) {
  const int64_t B = K / 8;
  discq_shares::for_chunks(N, 16, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < M; m0 += kRows) {
      const float* x = X + m0 * K;
      float* y = Y + m0 * N;
      switch (std::min<int64_t>(kRows, M - m0)) {
        case 1: rows_of<1>(T, codes, B, x, K, y, N, n0, n1); break;
        case 2: rows_of<2>(T, codes, B, x, K, y, N, n0, n1); break;
        case 3: rows_of<3>(T, codes, B, x, K, y, N, n0, n1); break;
        default: rows_of<4>(T, codes, B, x, K, y, N, n0, n1);
      }
    }
  });
}

// Above this many activation rows, decoding the weight once and one GEMM beat decoding it in
// registers once per four rows.
constexpr int64_t kFusedRows = 16;

// The unscaled weight [N, K] fp32 of 2-bit codes [N, K/4] uint8 (prefill, evaluation).
at::Tensor decode(const Tables& T, const at::Tensor& qdata) {
  const int64_t N = qdata.size(0), B = qdata.size(1) / 2;
  auto W = at::empty({N, B * 8}, qdata.options().dtype(at::kFloat));
  const uint8_t* codes = qdata.data_ptr<uint8_t>();
  float* out = W.data_ptr<float>();
  at::parallel_for(0, N * B, 4096, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      for (int i = 0; i < 8; ++i) out[8 * c + i] = code_weight(T, codes + 2 * c, i);
  });
  return W;
}

at::Tensor e8p_linear_cpu(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scale,
                          const at::Tensor& s_in, const at::Tensor& s_out,
                          const at::Tensor& q_in, const at::Tensor& q_out,
                          const std::optional<at::Tensor>& bias, const at::Tensor& patterns) {
  TORCH_CHECK(qdata.dim() == 2 && qdata.scalar_type() == at::kByte && x.dim() >= 1 &&
                  qdata.size(1) * 4 == x.size(-1),
              "qdata must be [N, K/4] uint8 (2-bit E8P codes) matching x [..., K]");
  TORCH_CHECK(patterns.numel() == 256 * 8 && patterns.scalar_type() == at::kFloat,
              "patterns must be E8P's [256, 8] float32 table");
  static const Tables T = make_tables(patterns.contiguous().data_ptr<float>());
  const auto qc = qdata.contiguous();
  const int64_t N = qdata.size(0);
  return discq_hadamard::rotated_linear(
      x, N, scale, s_in, s_out, q_in, q_out, bias, [&](const at::Tensor& xr) {
        if (xr.size(0) > kFusedRows) return at::mm(xr, decode(T, qc).t());
        auto y = at::empty({xr.size(0), N}, xr.options());
        product(T, qc.data_ptr<uint8_t>(), xr.data_ptr<float>(), y.data_ptr<float>(),
                xr.size(0), xr.size(1), N);
        return y;
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(discq, CPU, m) { m.impl("e8p_linear_cpu", &e8p_linear_cpu); }
