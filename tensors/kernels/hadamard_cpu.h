// The randomized Hadamard transforms of incoherence processing (tensors/hadamard.py defines
// them) on a few rows in place, for the CPU kernels that run a rotated format's whole linear
// in one call: T = Q ⊗ H for n = m·2^p (Q an m×m orthogonal factor, H the orthonormal
// Walsh–Hadamard transform of 2^p), R(x) = T(s ⊙ x), R⁻¹(y) = s ⊙ Tᵀ y.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

namespace discq_hadamard {

// x [n] in place: H on each of the m blocks of b = n/m entries
inline void fwht_blocks(float* x, int64_t n, int64_t m) {
  const int64_t b = n / m;
  const float norm = 1.f / std::sqrt(float(b));
  for (int64_t j = 0; j < m; ++j) {
    float* v = x + j * b;
    for (int64_t h = 1; h < b; h *= 2)
      for (int64_t i = 0; i < b; i += 2 * h)
        for (int64_t k = i; k < i + h; ++k) {
          const float a = v[k], c = v[k + h];
          v[k] = a + c, v[k + h] = a - c;
        }
    for (int64_t k = 0; k < b; ++k) v[k] *= norm;
  }
}

// x [n] in place: blocks mixed by Q (transposed: Qᵀ), x_i <- Σ_j Q[i, j] x_j, blocks of n/m
inline void mix_blocks(float* x, int64_t n, const float* Q, int64_t m, bool transposed,
                       std::vector<float>& tmp) {
  if (m == 1) return;
  const int64_t b = n / m;
  tmp.assign(x, x + n);
  for (int64_t i = 0; i < m; ++i) {
    float* out = x + i * b;
    for (int64_t k = 0; k < b; ++k) out[k] = 0.f;
    for (int64_t j = 0; j < m; ++j) {
      const float q = transposed ? Q[j * m + i] : Q[i * m + j];
      const float* in = tmp.data() + j * b;
      for (int64_t k = 0; k < b; ++k) out[k] += q * in[k];
    }
  }
}

// R(x) = T(s ⊙ x), one row in place (s: float or c10::Half, as stored)
template <typename S>
inline void rotate(float* x, int64_t n, const S* s, const float* Q, int64_t m,
                   std::vector<float>& tmp) {
  for (int64_t k = 0; k < n; ++k) x[k] *= float(s[k]);
  fwht_blocks(x, n, m);
  mix_blocks(x, n, Q, m, false, tmp);
}

// R⁻¹(y) = s ⊙ Tᵀ y (Tᵀ = Qᵀ ⊗ H: H is symmetric), one row in place
template <typename S>
inline void unrotate(float* y, int64_t n, const S* s, const float* Q, int64_t m,
                     std::vector<float>& tmp) {
  fwht_blocks(y, n, m);
  mix_blocks(y, n, Q, m, true, tmp);
  for (int64_t k = 0; k < n; ++k) y[k] *= float(s[k]);
}

// `rotated_linear` (below) with sign vectors of element type S
template <typename S, typename Product>
at::Tensor rotated_linear_as(const at::Tensor& x, int64_t N, const at::Tensor& scale,
                             const at::Tensor& s_in, const at::Tensor& s_out,
                             const at::Tensor& q_in, const at::Tensor& q_out,
                             const std::optional<at::Tensor>& bias, const Product& product) {
  const int64_t K = x.size(-1), M = K ? x.numel() / K : 0;
  const S* si = s_in.data_ptr<S>();
  const S* so = s_out.data_ptr<S>();
  const auto qi = q_in.to(at::kFloat).contiguous(), qo = q_out.to(at::kFloat).contiguous();
  auto xr = x.reshape({M, K}).to(at::kFloat, /*non_blocking=*/false, /*copy=*/true)
                .contiguous();
  at::parallel_for(0, M, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> tmp;
    for (int64_t r = r0; r < r1; ++r)
      rotate(xr.data_ptr<float>() + r * K, K, si, qi.data_ptr<float>(), qi.size(0), tmp);
  });
  at::Tensor y = product(xr).contiguous();
  const float a = scale.item<float>();
  at::Tensor b;
  if (bias) b = bias->to(at::kFloat).contiguous();
  at::parallel_for(0, M, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> tmp;
    for (int64_t r = r0; r < r1; ++r) {
      float* yr = y.data_ptr<float>() + r * N;
      for (int64_t n = 0; n < N; ++n) yr[n] *= a;
      unrotate(yr, N, so, qo.data_ptr<float>(), qo.size(0), tmp);
      if (b.defined())
        for (int64_t n = 0; n < N; ++n) yr[n] += b.data_ptr<float>()[n];
    }
  });
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return y.reshape(shape).to(x.scalar_type());
}

// A rotated format's whole linear, y = s_out ⊙ T_outᵀ(scale · P(T_in(s_in ⊙ x))) + b, around its
// product P: [M, K] float32 (rotated rows) -> [M, N] float32. x: [..., K] in any float type;
// y: [..., N] in x's type. The sign vectors are read as stored (fp16 or fp32), not converted.
template <typename Product>
at::Tensor rotated_linear(const at::Tensor& x, int64_t N, const at::Tensor& scale,
                          const at::Tensor& s_in, const at::Tensor& s_out, const at::Tensor& q_in,
                          const at::Tensor& q_out, const std::optional<at::Tensor>& bias,
                          const Product& product) {
  TORCH_CHECK(x.dim() >= 1 && at::isFloatingType(x.scalar_type()), "x must be float [..., K]");
  const int64_t K = x.size(-1);
  TORCH_CHECK(s_in.numel() == K && s_out.numel() == N && q_in.dim() == 2 && q_out.dim() == 2 &&
                  K % q_in.size(0) == 0 && N % q_out.size(0) == 0,
              "the rotation does not match the weight");
  TORCH_CHECK(!bias || bias->numel() == N, "bias must have one entry per output");
  if (s_in.scalar_type() == at::kHalf && s_out.scalar_type() == at::kHalf &&
      s_in.is_contiguous() && s_out.is_contiguous())
    return rotated_linear_as<c10::Half>(x, N, scale, s_in, s_out, q_in, q_out, bias, product);
  const auto si = s_in.to(at::kFloat).contiguous(), so = s_out.to(at::kFloat).contiguous();
  return rotated_linear_as<float>(x, N, scale, si, so, q_in, q_out, bias, product);
}

}  // namespace discq_hadamard
