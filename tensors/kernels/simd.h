// What discq's CPU kernels share (affine_cpu.cpp, gguf_cpu.cpp): the AVX2 switch and the
// horizontal sum of eight float lanes.
#pragma once

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DISCQ_AVX2 1

namespace discq_simd {
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
}  // namespace discq_simd
#endif
