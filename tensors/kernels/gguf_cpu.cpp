// y = x Ŵᵀ + b for weights stored as llama.cpp blocks (tensors/gguf_layout.py), on CPU.
//
// Up to GEMM_ROWS activation rows a fused loop: each block of a weight row is decoded once into
// a small buffer of floats on the stack (w = a·q + b per group of 16 or 32, with llama.cpp's
// rounding: the product a·q is exact in fp32, so it rounds once, as gguf's reference does) and
// dotted with every activation row while it is in L1; the dense weight is never written.
// Above, rows are decoded into a dense fp32 weight once and one GEMM runs.
//
// The decoders follow each format's definition (gguf_layout.py's table and field layouts); the
// tests check them against the `gguf` package's reference dequantizers through the Python
// layout, for every type.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstring>
#include <optional>
#include <string>

#include "simd.h"

namespace {

inline float fp16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(h);
}

// ---- one block -> its weights ----------------------------------------------------------
// Legacy types (32 weights, one group): byte j of qs holds weight j (low nibble) and j + 16.
void q4_0(const uint8_t* b, float* w) {
  const float d = fp16(b);
  for (int j = 0; j < 16; ++j) {
    w[j] = d * static_cast<float>(b[2 + j] & 15) + -8 * d;
    w[j + 16] = d * static_cast<float>(b[2 + j] >> 4) + -8 * d;
  }
}

void q4_1(const uint8_t* b, float* w) {
  const float d = fp16(b), m = fp16(b + 2);
  for (int j = 0; j < 16; ++j) {
    w[j] = d * static_cast<float>(b[4 + j] & 15) + m;
    w[j + 16] = d * static_cast<float>(b[4 + j] >> 4) + m;
  }
}

// Q5: bit i of the 4-byte qh word is the fifth bit of weight i.
void q5(const uint8_t* qh_p, const uint8_t* qs, float d, float m, float* w) {
  uint32_t qh;
  std::memcpy(&qh, qh_p, 4);
  for (int j = 0; j < 16; ++j) {
    const int lo = (qs[j] & 15) | (((qh >> j) & 1) << 4);
    const int hi = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
    w[j] = d * static_cast<float>(lo) + m;
    w[j + 16] = d * static_cast<float>(hi) + m;
  }
}

void q5_0(const uint8_t* b, float* w) { q5(b + 2, b + 6, fp16(b), -16 * fp16(b), w); }
void q5_1(const uint8_t* b, float* w) { q5(b + 4, b + 8, fp16(b), fp16(b + 2), w); }

void q8_0(const uint8_t* b, float* w) {
  const float d = fp16(b);
  for (int j = 0; j < 32; ++j) w[j] = d * static_cast<float>(static_cast<int8_t>(b[2 + j]));
}

// k-quants (256 weights). A 2-bit field of 64 bytes: weight (c·4 + s)·32 + l is bits 2s of byte
// c·32 + l.
inline int two_bits(const uint8_t* qs, int i) {
  const int c = i / 128, s = (i / 32) % 4, l = i % 32;
  return (qs[c * 32 + l] >> (2 * s)) & 3;
}

void q2_k(const uint8_t* b, float* w) {
  const uint8_t *sc = b, *qs = b + 16;
  const float d = fp16(b + 80), dmin = fp16(b + 82);
  for (int g = 0; g < 16; ++g) {
    const float a = d * static_cast<float>(sc[g] & 15);
    const float c = -(dmin * static_cast<float>(sc[g] >> 4));
    for (int i = g * 16; i < g * 16 + 16; ++i) w[i] = a * static_cast<float>(two_bits(qs, i)) + c;
  }
}

void q3_k(const uint8_t* b, float* w) {
  const uint8_t *hmask = b, *qs = b + 32, *sc = b + 96;
  const float d = fp16(b + 108);
  for (int g = 0; g < 16; ++g) {
    // 6-bit scale: low nibble from bytes 0..7, top two bits from bytes 8..11
    const int low = g < 8 ? sc[g] & 15 : sc[g - 8] >> 4;
    const int high = (sc[8 + g % 4] >> (2 * (g / 4))) & 3;
    const float a = d * static_cast<float>((low | (high << 4)) - 32);
    for (int i = g * 16; i < g * 16 + 16; ++i) {
      const int h = (hmask[i % 32] >> (i / 32)) & 1;  // weight s·32 + l: bit s of byte l
      w[i] = a * static_cast<float>(two_bits(qs, i) | (h << 2)) + -4 * a;
    }
  }
}

// Q4_K/Q5_K: 8 groups of 32 with 6-bit (scale, min) pairs packed in 12 bytes.
inline void six_bit_pair(const uint8_t* s, int j, int& sc, int& m) {
  if (j < 4) {
    sc = s[j] & 63;
    m = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
    m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// 4-bit field of 128 bytes: weight (c·2 + s)·32 + l is nibble s of byte c·32 + l.
inline int nibble(const uint8_t* qs, int i) {
  const int c = i / 64, s = (i / 32) % 2, l = i % 32;
  return (qs[c * 32 + l] >> (4 * s)) & 15;
}

void q45_k(const uint8_t* b, float* w, const uint8_t* qh) {
  const float d = fp16(b), dmin = fp16(b + 2);
  const uint8_t* qs = qh ? b + 48 : b + 16;
  for (int g = 0; g < 8; ++g) {
    int sc, m;
    six_bit_pair(b + 4, g, sc, m);
    const float a = d * static_cast<float>(sc), c = -(dmin * static_cast<float>(m));
    for (int i = g * 32; i < g * 32 + 32; ++i) {
      const int q = nibble(qs, i) | (qh ? ((qh[i % 32] >> (i / 32)) & 1) << 4 : 0);
      w[i] = a * static_cast<float>(q) + c;
    }
  }
}

void q4_k(const uint8_t* b, float* w) { q45_k(b, w, nullptr); }
void q5_k(const uint8_t* b, float* w) { q45_k(b, w, b + 16); }

void q6_k(const uint8_t* b, float* w) {
  const uint8_t *ql = b, *qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = fp16(b + 208);
  for (int i = 0; i < 256; ++i) {
    // ql: weight (c·2 + s)·64 + l is nibble s of byte c·64 + l
    const int lo = (ql[(i / 128) * 64 + i % 64] >> (4 * ((i / 64) % 2))) & 15;
    const int hi = (qh[(i / 128) * 32 + i % 32] >> (2 * ((i / 32) % 4))) & 3;
    const float a = d * static_cast<float>(sc[i / 16]);
    w[i] = a * static_cast<float>(lo | (hi << 4)) + -32 * a;
  }
}

// The 4-bit i-quants: code q stands for IQ4_LEVELS[q] (gguf_layout.IQ4_LEVELS), times the
// block's d (IQ4_NL) or its group's d·(ls - 32) (IQ4_XS); nibble order as Q4_0's per 32.
constexpr float IQ4_LEVELS[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                  1,    13,   25,  38,  53,  69,  89,  113};

void iq4_group(const uint8_t* qs, float a, float* w) {
  for (int j = 0; j < 16; ++j) {
    w[j] = a * IQ4_LEVELS[qs[j] & 15];
    w[j + 16] = a * IQ4_LEVELS[qs[j] >> 4];
  }
}

void iq4_nl(const uint8_t* b, float* w) { iq4_group(b + 2, fp16(b), w); }

void iq4_xs(const uint8_t* b, float* w) {
  const float d = fp16(b);
  const int h = b[2] | (b[3] << 8);  // scales_h: group g's top two bits at bit 2g
  for (int g = 0; g < 8; ++g) {
    const int ls = ((b[4 + g / 2] >> (4 * (g % 2))) & 15) | (((h >> (2 * g)) & 3) << 4);
    iq4_group(b + 8 + 16 * g, d * static_cast<float>(ls - 32), w + 32 * g);
  }
}

struct Type {
  const char* name;
  int block, nbytes;
  void (*decode)(const uint8_t*, float*);
};

constexpr Type TYPES[] = {
    {"Q4_0", 32, 18, q4_0},    {"Q4_1", 32, 20, q4_1},    {"Q5_0", 32, 22, q5_0},
    {"Q5_1", 32, 24, q5_1},    {"Q8_0", 32, 34, q8_0},    {"Q2_K", 256, 84, q2_k},
    {"Q3_K", 256, 110, q3_k},  {"Q4_K", 256, 144, q4_k},  {"Q5_K", 256, 176, q5_k},
    {"Q6_K", 256, 210, q6_k},  {"IQ4_NL", 32, 18, iq4_nl}, {"IQ4_XS", 256, 136, iq4_xs}};

const Type& find_type(const std::string& name) {
  for (const Type& t : TYPES)
    if (name == t.name) return t;
  TORCH_CHECK(false, "discq::gguf_linear_cpu: unknown block type ", name);
}

// acc += w[i]·x[i] lane-wise over n weights (a multiple of 8: blocks are 32 or 256); reduced to
// one float once per output row (a horizontal sum per block would cost as much as the block).
#ifdef DISCQ_AVX2
using Acc = __m256;
inline Acc zero_acc() { return _mm256_setzero_ps(); }
inline void dot_into(const float* w, const float* x, int n, Acc& acc) {
  for (int i = 0; i < n; i += 8)
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), acc);
}
inline float reduce(Acc a) { return discq_simd::hsum(a); }
#else
using Acc = float;
inline Acc zero_acc() { return 0.f; }
inline void dot_into(const float* w, const float* x, int n, Acc& acc) {
  for (int i = 0; i < n; ++i) acc += w[i] * x[i];
}
inline float reduce(Acc a) { return a; }
#endif

constexpr int64_t GEMM_ROWS = 64;  // as the affine kernel: above, decode once and one GEMM

// x: [M, K] -> y: [M, N] in x's dtype.
at::Tensor gguf_linear_cpu(const at::Tensor& x, const at::Tensor& qdata,
                           const std::optional<at::Tensor>& bias, const std::string& ggml_type,
                           int64_t in_features) {
  const Type& t = find_type(ggml_type);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == in_features, "x must be [M, in_features]");
  TORCH_CHECK(in_features % t.block == 0, ggml_type, " rows hold whole blocks of ", t.block);
  const int64_t M = x.size(0), N = qdata.size(0), K = in_features, nb = K / t.block;
  TORCH_CHECK(qdata.scalar_type() == at::kByte && qdata.dim() == 2 &&
                  qdata.size(1) == nb * t.nbytes,
              "qdata must be uint8 [N, K / block · bytes per block]");
  at::Tensor xf = x.to(at::kFloat).contiguous(), q = qdata.contiguous();
  const float* xp = xf.data_ptr<float>();
  const uint8_t* qp = q.data_ptr<uint8_t>();
  if (M > GEMM_ROWS) {
    at::Tensor W = at::empty({N, K}, xf.options());
    float* Wp = W.data_ptr<float>();
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t j = 0; j < nb; ++j)
          t.decode(qp + (n * nb + j) * t.nbytes, Wp + n * K + j * t.block);
    });
    at::Tensor y = bias ? at::addmm(bias->to(at::kFloat), xf, W.t()) : at::mm(xf, W.t());
    return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
  }
  at::Tensor y = at::empty({M, N}, xf.options());
  float* yp = y.data_ptr<float>();
  at::Tensor b = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    alignas(32) float w[256];
    Acc acc[GEMM_ROWS];
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t m = 0; m < M; ++m) acc[m] = zero_acc();
      for (int64_t j = 0; j < nb; ++j) {
        t.decode(qp + (n * nb + j) * t.nbytes, w);  // once per block, for every row of x
        for (int64_t m = 0; m < M; ++m) dot_into(w, xp + m * K + j * t.block, t.block, acc[m]);
      }
      for (int64_t m = 0; m < M; ++m) {
        const float v = reduce(acc[m]);
        yp[m * N + n] = bp ? v + bp[n] : v;
      }
    }
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(discq, CPU, m) {
  m.impl("gguf_linear_cpu", &gguf_linear_cpu);
}
