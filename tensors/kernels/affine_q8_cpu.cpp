// y = x̂ Ŵᵀ + b for the packed affine grid with 8-bit activations: x rounded per block of 32
// inputs to x̂ = d_b · xq (xq ∈ [-127, 127], d_b = max|x_b| / 127: llama.cpp's Q8_0), so each
// block's Σ q·xq is an integer dot product. Per 32 weights that is one unpack of the codes to
// bytes, one maddubs and one madd (16-bit pair sums, then 32-bit; one vpdpbusd where the CPU
// has VNNI and the library was built for it), where the float kernel (affine_cpu.cpp) converts
// and multiplies 8 codes at a time: ~3x fewer instructions, and decode on a few cores is bound
// by instructions, not by memory.
//
// Per row n and block b in group g: Σ_k (q_k - z)·x̂_k = s_g·d_b·Σ q·xq - s_g·z·d_b·Σ xq; the
// integer dot is scaled by one FMA per block, d_b·Σ xq is computed once per activation row.
//
// The AVX2 unpackers leave a block's 32 codes in whatever order costs no shuffles (code_at);
// the activation codes are stored in the same order (place), so the dot product is unchanged.
// 4-bit rows go two blocks per 32-byte load (PAIRS): one and + one shift + one and unpack 64
// codes, the two halves' byte products meet in 16 bits before one madd, and each pair's int32
// lanes are scaled by [c_2p ×4 | c_2p+1 ×4]: ~30% fewer instructions than a block at a time
// on AVX2. Any number of activation rows, in blocks of ROW_BLOCK (run).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "shares.h"
#include "simd.h"

namespace {

constexpr int QB = 32;              // activations per 8-bit block
#if defined(__AVX512VL__)
constexpr int WIDE_NR = 4;  // 32 vector registers: 4x4 tiles
#else
constexpr int WIDE_NR = 2;
#endif
constexpr int64_t ROW_BLOCK = 64;   // activation rows per pass over the weights (run)

// Which code of a block sits at byte p after unpack<BITS> (see the unpackers).
template <int BITS>
constexpr int code_at(int p) {
#ifdef DISCQ_AVX2
  if constexpr (BITS == 2) return 4 * (p % 8) + p / 8;
  if constexpr (BITS == 3) return (p % 16 < 8 ? 0 : 16) + 8 * (p / 16) + p % 8;
#endif
  return p;
}

template <int BITS>
constexpr int block_bytes() { return QB * BITS / 8; }

// 4-bit codes are unpacked two blocks at a time (one 32-byte load: low nibbles are the blocks'
// even codes, high nibbles their odd ones), so the activations of blocks 2p and 2p+1 are stored
// together as [2p even | 2p+1 even | 2p odd | 2p+1 odd], 16 codes each (see place).
#ifdef DISCQ_AVX2
template <int BITS>
constexpr bool PAIRS = BITS == 4;
#else
template <int BITS>
constexpr bool PAIRS = false;
#endif


// Blocks per row rounded up to whole vectors of 8: the per-block factors below are zero past KB,
// so the tile's vector loops need no scalar tails.
inline int64_t padded(int64_t KB) { return (KB + 7) / 8 * 8; }

struct Acts {
  const int8_t* xq;     // [M, Kp] codes (Kp = KBp·32: zero past KB), blocks laid out by place
  const float* d;       // [M, KBp] block scales d_b
  const float* dxs;     // [M, KBp] d_b · Σ xq_b (the zero point's partner)
};

struct Problem {
  Acts a;
  const uint8_t* qdata;  // [N, Wb]
  const uint8_t* zero;   // [N, G] or nullptr (symmetric: 2^(b-1))
  const float* bias;     // [N] or nullptr
  float* y;              // [M, N]
  int64_t M, N, Kp, KB, KBp, G, Wb, blocks_per_group;
};

// One block's 32 activations -> max|x|, its codes (natural order) and their sum. The rounding
// is x·(1/d) to nearest, ties to even, exactly as the torch reference (kernels/affine_ref.py,
// round_activations).
template <int BITS>
inline int quantize_block(const float* xb, float& db, int8_t* out) {
#ifdef DISCQ_AVX2
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 v[4], amax = _mm256_setzero_ps();
  for (int k = 0; k < 4; ++k) {
    v[k] = _mm256_loadu_ps(xb + 8 * k);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[k]));
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  db = _mm_cvtss_f32(m4) / 127.f;
  const __m256 id = _mm256_set1_ps(db != 0.f ? 1.f / db : 0.f);
  const __m256 lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
  __m256i q[4], sum = _mm256_setzero_si256();
  for (int k = 0; k < 4; ++k) {
    const __m256 r = _mm256_round_ps(_mm256_mul_ps(v[k], id),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q[k] = _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, r)));
    sum = _mm256_add_epi32(sum, q[k]);
  }
  // 32 int32 -> 32 int8 in natural order (packs interleave 128-bit lanes; the permute undoes it)
  const __m256i p = _mm256_permutevar8x32_epi32(
      _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3])),
      _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), p);
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
  return _mm_cvtsi128_si32(s4);
#else
  float amax = 0.f;
  for (int i = 0; i < QB; ++i) amax = std::max(amax, std::fabs(xb[i]));
  db = amax / 127.f;
  const float id = db != 0.f ? 1.f / db : 0.f;
  int sum = 0;
  for (int i = 0; i < QB; ++i) {
    const float v = std::nearbyint(xb[i] * id);
    out[i] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, v)));
    sum += out[i];
  }
  return sum;
#endif
}

// Block b's codes (natural order) into its row as the unpackers leave the weights: in
// code_at order, or for PAIRS in its half of the pair's even and odd runs.
template <int BITS>
inline void place(const int8_t* nat, int64_t b, int8_t* row) {
  if constexpr (PAIRS<BITS>) {
    int8_t* pair = row + (b / 2) * 2 * QB + (b % 2) * 16;
    for (int i = 0; i < 16; ++i) {
      pair[i] = nat[2 * i];
      pair[QB + i] = nat[2 * i + 1];
    }
  } else {
    for (int i = 0; i < QB; ++i) row[b * QB + i] = nat[code_at<BITS>(i)];
  }
}

// Rows of x [M, K] -> codes [M, KBp·32] (zero past block KB), block scales and d·Σxq [M, KBp].
template <int BITS>
void quantize_rows(const float* x, int64_t M, int64_t K, int64_t KBp, int8_t* xq, float* d,
                   float* dxs) {
  const int64_t KB = K / QB, Kp = KBp * QB;
  for (int64_t m = 0; m < M; ++m) {
    float* dm = d + m * KBp;
    int8_t* row = xq + m * Kp;
    // zero from the last whole pair on: an odd last block's partner and the padded blocks
    std::memset(row + (KB / 2) * 2 * QB, 0, Kp - (KB / 2) * 2 * QB);
    for (int64_t b = 0; b < KB; ++b) {
      alignas(32) int8_t nat[QB];
      const int sum = quantize_block<BITS>(x + m * K + b * QB, dm[b], nat);
      place<BITS>(nat, b, row);
      dxs[m * KBp + b] = dm[b] * static_cast<float>(sum);
    }
    std::fill(dm + KB, dm + KBp, 0.f);
    std::fill(dxs + m * KBp + KB, dxs + (m + 1) * KBp, 0.f);
  }
}

#ifdef DISCQ_AVX2
// One block's 32 codes as bytes (signed for 8-bit: q - 128, so the dot fits maddubs).
template <int BITS>
inline __m256i unpack(const uint8_t* w) {
  // (4-bit rows go two blocks at a time: unpack_pair)
  if constexpr (BITS == 2) {  // byte j holds codes 4j..4j+3; lane l takes bits 2l
    int64_t q;
    std::memcpy(&q, w, 8);
    const __m256i v = _mm256_srlv_epi64(_mm256_set1_epi64x(q), _mm256_setr_epi64x(0, 2, 4, 6));
    return _mm256_and_si256(v, _mm256_set1_epi8(3));
  } else if constexpr (BITS == 3) {
    // four runs of 3 bytes; each 16-bit lane takes the two bytes holding one code (half h of
    // v0 run h, of v1 run 2+h; lane l code l of the run), shifts it to bit 7 with a multiply
    // (AVX2 has no per-lane 16-bit shift) and down to bit 0
    int32_t hi;
    std::memcpy(&hi, w + 8, 4);
    __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w));
    b = _mm_insert_epi32(b, hi, 2);
    const __m256i B = _mm256_broadcastsi128_si256(b);
    const __m256i s0 = _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 1, 2, 1, 2, 1, 2, 2, 3, 2, 3,
                                        3, 4, 3, 4, 3, 4, 4, 5, 4, 5, 4, 5, 5, 6, 5, 6);
    const __m256i s1 = _mm256_add_epi8(s0, _mm256_set1_epi8(6));
    const __m256i mul = _mm256_setr_epi16(128, 16, 2, 64, 8, 1, 32, 4,
                                          128, 16, 2, 64, 8, 1, 32, 4);
    const __m256i mask = _mm256_set1_epi16(7);
    const __m256i v0 = _mm256_and_si256(
        _mm256_srli_epi16(_mm256_mullo_epi16(_mm256_shuffle_epi8(B, s0), mul), 7), mask);
    const __m256i v1 = _mm256_and_si256(
        _mm256_srli_epi16(_mm256_mullo_epi16(_mm256_shuffle_epi8(B, s1), mul), 7), mask);
    return _mm256_packus_epi16(v0, v1);
  } else {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
    return _mm256_xor_si256(v, _mm256_set1_epi8(static_cast<char>(0x80)));
  }
}

// Σ w·x over 32 bytes as 8 int32 lanes. maddubs takes unsigned × signed: 8-bit codes go in as
// |w| against x with w's sign (|pair sum| ≤ 2·128·127 < 2^15; 2-4 bit codes ≤ 2·15·127).
// Where the CPU has VNNI (built with it: affine_cpu.py's flags), one vpdpbusd does both steps;
// the pair sums never saturate above, so both give the same integers.
template <int BITS>
inline __m256i dot(__m256i w, __m256i x) {
  if constexpr (BITS == 8) {
    x = _mm256_sign_epi8(x, w);
    w = _mm256_sign_epi8(w, w);
  }
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), w, x);
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1));
#endif
}

// Blocks 2p and 2p+1 of one 4-bit row: even codes (low nibbles) and odd codes (high), each
// [2p's 16 | 2p+1's 16]; `half`: only block 2p is there (the row's odd last block: 16 bytes).
inline void unpack_pair(const uint8_t* w, bool half, __m256i& lo, __m256i& hi) {
  const __m256i v = half ? _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)))
                         : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  const __m256i mask = _mm256_set1_epi8(0x0F);
  lo = _mm256_and_si256(v, mask);
  hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
}

// Σ w·x of two blocks at once: int32 lanes 0-3 block 2p's, 4-7 block 2p+1's (16-bit sums of
// both halves first: |·| ≤ 4·15·127, no saturation).
inline __m256i dot_pair(__m256i lo, __m256i hi, const int8_t* x) {
  const __m256i xl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  const __m256i xh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + QB));
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), lo, xl), hi, xh);
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, xl), hi, xh);
#else
  return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, xl),
                                            _mm256_maddubs_epi16(hi, xh)),
                           _mm256_set1_epi16(1));
#endif
}
#endif

// The G scales of one row as floats.
template <typename S>
inline void scales_f32(const S* s, int64_t G, float* out) {
  int64_t g = 0;
#ifdef DISCQ_AVX2
  for (; g + 8 <= G; g += 8) {
    if constexpr (std::is_same_v<S, float>) {
      _mm256_storeu_ps(out + g, _mm256_loadu_ps(s + g));
    } else {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + g));
      _mm256_storeu_ps(out + g, std::is_same_v<S, c10::Half>
                                    ? _mm256_cvtph_ps(h)
                                    : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
    }
  }
#endif
  for (; g < G; ++g) out[g] = static_cast<float>(s[g]);
}

// The weight side of NR rows, per block (zero past KB): sb[j][b] = s_{n0+j, g(b)} and
// szb[j][b] = s·ẑ with ẑ the zero point as the dot saw it: z - z0 for a row's zero points z
// (z0 = 128 for 8-bit codes, which entered the dot as q - 128; else 0), or z0 itself for
// symmetric grids (2^(b-1); 0 for 8-bit codes). `sg`: G floats of scratch.
template <int BITS, int NR, typename S>
void weight_factors(const Problem& P, const S* scale, int64_t n0, float* sb, float* szb,
                    float* sg) {
  const float z0 = P.zero ? (BITS == 8 ? 128.f : 0.f) : (BITS == 8 ? 0.f : float(1 << (BITS - 1)));
  const int64_t bpg = P.blocks_per_group;
  for (int j = 0; j < NR; ++j) {
    float* sj = sb + j * P.KBp;
    float* zj = szb + j * P.KBp;
    if (bpg == 1) {
      scales_f32(scale + (n0 + j) * P.G, P.G, sj);
    } else {
      scales_f32(scale + (n0 + j) * P.G, P.G, sg);
      for (int64_t b = 0; b < P.KB; ++b) sj[b] = sg[b / bpg];
    }
    std::fill(sj + P.KB, sj + P.KBp, 0.f);
    if (const uint8_t* z = P.zero ? P.zero + (n0 + j) * P.G : nullptr)
      for (int64_t b = 0; b < P.KB; ++b) zj[b] = sj[b] * (static_cast<float>(z[b / bpg]) - z0);
    else
      for (int64_t b = 0; b < P.KB; ++b) zj[b] = sj[b] * z0;
    std::fill(zj + P.KB, zj + P.KBp, 0.f);
  }
}

#ifdef DISCQ_AVX2
// The sums of T = MT·NR (activation row, weight row) pairs from their accumulators (a pair's
// sum is that of its 8 lanes), four pairs per hadd tree. Every pair's lanes are added in the
// same order whatever the tile, so an output does not depend on the tile it fell in (fused
// sibling linears give the bits of separate calls).
template <int T>
inline void pair_sums(const __m256 (&t)[T], float (&out)[T]) {
  for (int p = 0; p < T; p += 4) {
    __m256 u[4];
    for (int q = 0; q < 4; ++q) u[q] = p + q < T ? t[p + q] : _mm256_setzero_ps();
    const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(u[0], u[1]), _mm256_hadd_ps(u[2], u[3]));
    alignas(16) float r[4];  // a = [Σ lanes 0-3 of pairs p..p+3 | Σ lanes 4-7 of the same]
    _mm_store_ps(r, _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1)));
    for (int q = 0; p + q < T && q < 4; ++q) out[p + q] = r[q];
  }
}

// The block factors c[i·NR + j][b] = s_{j,g(b)}·d_{i,b} (each block's integer dot scaled by
// one FMA), and the accumulators' starting lanes: the zero point's term -Σ_b d·Σxq·s·ẑ, spread
// over lanes that are summed at the end anyway.
template <int MT, int NR>
inline void tile_setup(const Problem& P, const float* sb, const float* szb, int64_t m0,
                       float* c, __m256 (&tot)[MT * NR]) {
  constexpr int T = MT * NR;
  const int64_t KBp = P.KBp;
  const float* d = P.a.d + m0 * KBp;
  const float* dxs = P.a.dxs + m0 * KBp;
  for (int p = 0; p < T; ++p) tot[p] = _mm256_setzero_ps();
  for (int64_t v = 0; v < KBp; v += 8) {
    for (int i = 0; i < MT; ++i) {
      const __m256 di = _mm256_loadu_ps(d + i * KBp + v), dx = _mm256_loadu_ps(dxs + i * KBp + v);
      for (int j = 0; j < NR; ++j) {
        _mm256_storeu_ps(c + (i * NR + j) * KBp + v,
                         _mm256_mul_ps(_mm256_loadu_ps(sb + j * KBp + v), di));
        tot[i * NR + j] = _mm256_fnmadd_ps(dx, _mm256_loadu_ps(szb + j * KBp + v), tot[i * NR + j]);
      }
    }
  }
}

// The tile's blocks two at a time (4-bit, PAIRS): each pair's factors [c_2p ×4 | c_2p+1 ×4]
// against the pair's int32 lanes.
template <int MT, int NR>
inline void pair_loop(const Problem& P, const int8_t* xb, const uint8_t* wb, const char* ahead,
                      const float* c, __m256 (&tot)[MT * NR]) {
  constexpr int BB = block_bytes<4>();
  const int64_t Kp = P.Kp, Wb = P.Wb, KB = P.KB, KBp = P.KBp;
  for (int64_t b = 0; b < KB; b += 2, xb += 2 * QB, wb += 2 * BB) {
    if (ahead)
      for (int64_t off = b * NR * BB; off < (b + 2) * NR * BB; off += 64)
        _mm_prefetch(ahead + off, _MM_HINT_T0);
    __m256i lo[NR], hi[NR];
    for (int j = 0; j < NR; ++j) unpack_pair(wb + j * Wb, b + 1 == KB, lo[j], hi[j]);
    for (int i = 0; i < MT; ++i)
      for (int j = 0; j < NR; ++j) {
        const float* cb = c + (i * NR + j) * KBp + b;  // c[b + 1] is 0 past KB (padded)
        const __m256 f = _mm256_set_m128(_mm_broadcast_ss(cb + 1), _mm_broadcast_ss(cb));
        tot[i * NR + j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_pair(lo[j], hi[j], xb + i * Kp)),
                                          f, tot[i * NR + j]);
      }
  }
}

// y[m0..m0+MT, n0..n0+NR]: MT activation rows against NR weight rows, every code unpacked once
// per tile and every activation block loaded once per tile.
template <int BITS, int MT, int NR>
void tile(const Problem& P, const float* sb, const float* szb, int64_t m0, int64_t n0,
          const char* ahead, float* c) {
  constexpr int BB = block_bytes<BITS>(), T = MT * NR;
  __m256 tot[T];
  tile_setup<MT, NR>(P, sb, szb, m0, c, tot);
  // local copies: the stores through y and c would otherwise make the compiler reload P's fields
  const int64_t Kp = P.Kp, Wb = P.Wb, KB = P.KB, KBp = P.KBp;
  const int8_t* xb = P.a.xq + m0 * Kp;
  const uint8_t* wb = P.qdata + n0 * Wb;
  if constexpr (PAIRS<BITS>) {
    pair_loop<MT, NR>(P, xb, wb, ahead, c, tot);
  } else for (int64_t b = 0; b < KB; ++b, xb += QB, wb += BB) {
    // the next rows, spread over this tile's blocks: a call's rows are a short stream that the
    // hardware prefetcher picks up too late
    if (ahead)
      for (int64_t off = b * NR * BB; off < (b + 1) * NR * BB; off += 64)
        _mm_prefetch(ahead + off, _MM_HINT_T0);
    __m256i w[NR];
    for (int j = 0; j < NR; ++j) w[j] = unpack<BITS>(wb + j * Wb);
    for (int i = 0; i < MT; ++i) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + i * Kp));
      for (int j = 0; j < NR; ++j)
        tot[i * NR + j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot<BITS>(w[j], xv)),
                                          _mm256_broadcast_ss(c + (i * NR + j) * KBp + b),
                                          tot[i * NR + j]);
    }
  }
  float out[T];
  pair_sums<T>(tot, out);
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NR; ++j)
      P.y[(m0 + i) * P.N + n0 + j] = out[i * NR + j] + (P.bias ? P.bias[n0 + j] : 0.f);
}
#else
// Portable: the same sums one code at a time (codes in natural order, code_at is the identity),
// from the same block factors and zero-point terms.
template <int BITS>
inline int code(const uint8_t* row, int64_t k) {
  const int64_t bit = k * BITS;
  if constexpr (BITS == 8) return static_cast<int>(row[k]) - 128;
  const uint32_t two = row[bit / 8] | (bit % 8 + BITS > 8 ? row[bit / 8 + 1] << 8 : 0);
  return static_cast<int>((two >> (bit % 8)) & ((1u << BITS) - 1));
}

template <int BITS, int MT, int NR>
void tile(const Problem& P, const float* sb, const float* szb, int64_t m0, int64_t n0,
          const char*, float*) {
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NR; ++j) {
      const int64_t m = m0 + i, n = n0 + j;
      const uint8_t* row = P.qdata + n * P.Wb;
      float v = 0.f;
      for (int64_t b = 0; b < P.KB; ++b) {
        int32_t dot = 0;
        for (int p = 0; p < QB; ++p)
          dot += code<BITS>(row, b * QB + p) * P.a.xq[m * P.Kp + b * QB + p];
        v += sb[j * P.KBp + b] * P.a.d[m * P.KBp + b] * static_cast<float>(dot)
             - P.a.dxs[m * P.KBp + b] * szb[j * P.KBp + b];
      }
      P.y[m * P.N + n] = P.bias ? v + P.bias[n] : v;
    }
}
#endif

// Every activation row against weight rows n0..n0+NR: their factors once, then tiles of up to
// 4 activation rows (one row: NR = 4, four weight rows sharing its loads; else NR = WIDE_NR).
// `buf`: 2·NR·KBp + 16·KBp + G floats (tiles up to 4 × 4).
template <int BITS, int NR, typename S>
void column(const Problem& P, const S* scale, int64_t n0, float* buf) {
  float* sb = buf;
  float* szb = sb + NR * P.KBp;
  float* c = szb + NR * P.KBp;
  weight_factors<BITS, NR, S>(P, scale, n0, sb, szb, c + 16 * P.KBp);
  // the next rows, prefetched over the first tile's blocks
  const char* ahead = n0 + 2 * NR <= P.N
                          ? reinterpret_cast<const char*>(P.qdata + (n0 + NR) * P.Wb) : nullptr;
  int64_t m0 = 0;
  if constexpr (NR <= WIDE_NR)
    for (; m0 + 4 <= P.M; m0 += 4, ahead = nullptr) tile<BITS, 4, NR>(P, sb, szb, m0, n0, ahead, c);
  switch (P.M - m0) {
    case 3: tile<BITS, 3, NR>(P, sb, szb, m0, n0, ahead, c); break;
    case 2: tile<BITS, 2, NR>(P, sb, szb, m0, n0, ahead, c); break;
    case 1: tile<BITS, 1, NR>(P, sb, szb, m0, n0, ahead, c); break;
    default: break;
  }
}

// Every activation row against output channels n0..n1.
template <int BITS, int NR, typename S>
void channels(const Problem& P, const S* scale, int64_t n0, int64_t n1, float* buf) {
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) column<BITS, NR, S>(P, scale, n, buf);
  for (; n < n1; ++n) column<BITS, 1, S>(P, scale, n, buf);
}

template <int BITS, typename S>
void run_rows(const Problem& P, const S* scale) {
  discq_shares::for_chunks(P.N, 32, 64, [&](int64_t n0, int64_t n1) {
    thread_local std::vector<float> buf;  // column's scratch, NR ≤ 4
    buf.resize(std::max<size_t>(buf.size(), 24 * P.KBp + P.G));
    if (P.M == 1)
      channels<BITS, 4, S>(P, scale, n0, n1, buf.data());
    else
      channels<BITS, WIDE_NR, S>(P, scale, n0, n1, buf.data());
  });
}

// Blocks of ROW_BLOCK activation rows, one after the other: a block's codes (≤ 96 KiB for
// K = 1536) stay in L2 while every weight column walks them, and each block reads every weight
// once (a prefill of S rows reads the weights S/64 times, against S·64 row-block products).
template <int BITS, typename S>
void run(const Problem& P, const S* scale) {
  for (int64_t m0 = 0; m0 < P.M; m0 += ROW_BLOCK) {
    Problem B = P;
    B.M = std::min(ROW_BLOCK, P.M - m0);
    B.a = {P.a.xq + m0 * P.Kp, P.a.d + m0 * P.KBp, P.a.dxs + m0 * P.KBp};
    B.y = P.y + m0 * P.N;
    run_rows<BITS, S>(B, scale);
  }
}

// The activation codes, block scales and group sums live in buffers kept by the calling thread
// across calls (a decode step makes ~200 calls; three allocations each were measurable).
struct Scratch {
  std::vector<int8_t> xq;
  std::vector<float> d, dxs;
};

template <int BITS>
void quantize_and_run(const float* xf, Problem& P, const at::Tensor& s) {
  thread_local Scratch t;
  t.xq.resize(std::max<size_t>(t.xq.size(), P.M * P.Kp));
  t.d.resize(std::max<size_t>(t.d.size(), P.M * P.KBp));
  t.dxs.resize(std::max<size_t>(t.dxs.size(), P.M * P.KBp));
  quantize_rows<BITS>(xf, P.M, P.KB * QB, P.KBp, t.xq.data(), t.d.data(), t.dxs.data());
  P.a = {t.xq.data(), t.d.data(), t.dxs.data()};
  switch (s.scalar_type()) {
    case at::kFloat: return run<BITS, float>(P, s.data_ptr<float>());
    case at::kHalf: return run<BITS, c10::Half>(P, s.data_ptr<c10::Half>());
    case at::kBFloat16: return run<BITS, c10::BFloat16>(P, s.data_ptr<c10::BFloat16>());
    default: TORCH_CHECK(false, "scale must be float32, float16 or bfloat16");
  }
}

at::Tensor affine_linear_q8_cpu(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scale,
                                const std::optional<at::Tensor>& zero_point,
                                const std::optional<at::Tensor>& bias, int64_t bits,
                                int64_t group_size, int64_t in_features) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == in_features, "x must be [M, in_features]");
  TORCH_CHECK(in_features % QB == 0 && group_size % QB == 0,
              "8-bit activations need in_features and group_size multiples of 32");
  TORCH_CHECK(qdata.scalar_type() == at::kByte && qdata.dim() == 2, "qdata must be 2-D uint8");
  const int64_t M = x.size(0), N = qdata.size(0), K = in_features, G = (K + group_size - 1) / group_size;
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == N && scale.size(1) == G, "scale must be [N, G]");
  TORCH_CHECK(qdata.size(1) >= K * bits / 8, "qdata is narrower than the packed rows");
  at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor q = qdata.contiguous(), s = scale.contiguous(), z, b;
  if (zero_point) {
    TORCH_CHECK(zero_point->scalar_type() == at::kByte && zero_point->sizes() == scale.sizes(),
                "zero_point must be uint8 shaped like scale");
    z = zero_point->contiguous();
  }
  if (bias) b = bias->to(at::kFloat).contiguous();
  at::Tensor y = at::empty({M, N}, xf.options());
  Problem P{{}, q.data_ptr<uint8_t>(), z.defined() ? z.data_ptr<uint8_t>() : nullptr,
            b.defined() ? b.data_ptr<float>() : nullptr, y.data_ptr<float>(),
            M, N, padded(K / QB) * QB, K / QB, padded(K / QB), G, q.size(1), group_size / QB};
  switch (bits) {
    case 2: quantize_and_run<2>(xf.data_ptr<float>(), P, s); break;
    case 3: quantize_and_run<3>(xf.data_ptr<float>(), P, s); break;
    case 4: quantize_and_run<4>(xf.data_ptr<float>(), P, s); break;
    case 8: quantize_and_run<8>(xf.data_ptr<float>(), P, s); break;
    default: TORCH_CHECK(false, "discq::affine_linear_q8_cpu: bits must be 2, 3, 4 or 8, got ", bits);
  }
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(discq, CPU, m) {
  m.impl("affine_linear_q8_cpu", &affine_linear_q8_cpu);
}
