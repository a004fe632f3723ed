// discq::argmin_bmm_cpu: the index of the smallest entry of every row of A @ B, batched,
// without writing the products to memory: out[g, p] = argmin_e Σ_k A[g, p, k] B[g, k, e] (the
// first on ties). Weighted k-means assignment is this with A = [w x, w] and B = [−2c, c²]ᵀ
// (tensors/kmeans.py): for GPTVQ's 256-codeword codebooks torch's bmm + argmin spends most of
// its time in argmin's reduction, here a row's E sums stay in a buffer in L1.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "simd.h"

namespace {

// One row, portable: dist[e] = Σ_k a[k] Bg[k, e], then the first minimum.
int64_t row_argmin(const float* a, const float* Bg, int64_t k, int64_t E, float* dist) {
  for (int64_t e = 0; e < E; ++e) dist[e] = a[0] * Bg[e];
  for (int64_t i = 1; i < k; ++i) {
    const float t = a[i];
    const float* b = Bg + i * E;
    for (int64_t e = 0; e < E; ++e) dist[e] += t * b[e];
  }
  int64_t best = 0;
  for (int64_t e = 1; e < E; ++e)
    if (dist[e] < dist[best]) best = e;
  return best;
}

#ifdef DISCQ_AVX2
// One row, eight codewords a step: each lane keeps its smallest sum and where (strict <, so
// the first in the lane); the answer is the smallest index among the lanes holding the minimum,
// i.e. the first overall.
int64_t row_argmin_avx2(const float* a, const float* Bg, int64_t k, int64_t E) {
  __m256 lo = _mm256_set1_ps(INFINITY);
  __m256i at = _mm256_set1_epi32(0), e8 = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i step = _mm256_set1_epi32(8);
  for (int64_t e = 0; e < E; e += 8) {
    __m256 d = _mm256_mul_ps(_mm256_set1_ps(a[0]), _mm256_loadu_ps(Bg + e));
    for (int64_t i = 1; i < k; ++i)
      d = _mm256_fmadd_ps(_mm256_set1_ps(a[i]), _mm256_loadu_ps(Bg + i * E + e), d);
    const __m256 less = _mm256_cmp_ps(d, lo, _CMP_LT_OQ);
    lo = _mm256_blendv_ps(lo, d, less);
    at = _mm256_blendv_epi8(at, e8, _mm256_castps_si256(less));
    e8 = _mm256_add_epi32(e8, step);
  }
  alignas(32) float v[8];
  alignas(32) int32_t ix[8];
  _mm256_store_ps(v, lo);
  _mm256_store_si256(reinterpret_cast<__m256i*>(ix), at);
  int64_t best = ix[0];
  float m = v[0];
  for (int l = 1; l < 8; ++l)
    if (v[l] < m || (v[l] == m && ix[l] < best)) m = v[l], best = ix[l];
  return best;
}
#endif

// A: [G, P, k], B: [G, k, E] float32 -> [G, P] int64.
at::Tensor argmin_bmm_cpu(const at::Tensor& A, const at::Tensor& B) {
  TORCH_CHECK(A.dim() == 3 && B.dim() == 3 && A.size(0) == B.size(0) && A.size(2) == B.size(1)
                  && A.scalar_type() == at::kFloat && B.scalar_type() == at::kFloat,
              "A [G, P, k] and B [G, k, E] must be float32 with matching G and k");
  const int64_t G = A.size(0), P = A.size(1), k = A.size(2), E = B.size(2);
  TORCH_CHECK(E > 0 && k > 0, "B must have at least one column and one row");
  const at::Tensor Ac = A.contiguous(), Bc = B.contiguous();
  at::Tensor out = at::empty({G, P}, A.options().dtype(at::kLong));
  const float* ap = Ac.data_ptr<float>();
  const float* bp = Bc.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, G * P, 512, [&](int64_t r0, int64_t r1) {
    std::vector<float> dist(E);
    for (int64_t r = r0; r < r1; ++r) {
      const float *a = ap + r * k, *Bg = bp + (r / P) * k * E;
#ifdef DISCQ_AVX2
      if (E % 8 == 0) {
        op[r] = row_argmin_avx2(a, Bg, k, E);
        continue;
      }
#endif
      op[r] = row_argmin(a, Bg, k, E, dist.data());
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(discq, CPU, m) {
  m.impl("argmin_bmm_cpu", &argmin_bmm_cpu);
}
