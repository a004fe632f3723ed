// QTIP trellis decoding shared by the scalar kernel (trellis_cpu.cpp) and the AVX2 lane kernel
// (trellis_lanes.cpp).
#pragma once

#include <cstdint>

#include "simd.h"

namespace discq_trellis {

enum Code { kOneMad, kThreeInst, kHyb };

struct Coding {
  Code code;
  int bits, V, Q, L;
  const float* lut;  // HYB: [2^Q][2]
};

// y [M, NT·16] += x [M, K] Ŵᵀ, Ŵ the unscaled coded matrix of qdata [NT, KT, 8·bits], eight
// tiles a vector; `lut`: HYB's table as fp16 bits [2^Q][2]. False (nothing written) where this
// build or coding has no lane kernel: the caller runs the scalar one.
bool linear_lanes(const Coding& C, const uint16_t* lut, const float* X, const int32_t* qdata,
                  float* Y, int64_t M, int64_t K, int64_t NT, int64_t KT);

}  // namespace discq_trellis
