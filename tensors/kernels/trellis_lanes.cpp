// QTIP's trellis decode in AVX2 lanes: y = x Ŵᵀ for a few activation rows, every weight computed
// from its state in registers and never written (trellis_cpu.cpp's `decode_tile` is the scalar
// definition this must equal). Two ways to fill the 8 lanes:
//
// 2 bits a weight (`linear_rows`): the lanes are one tile row's consecutive steps. All of their
// states lie in two words of the tile's stream, so they are two broadcasts under per-lane
// shifts; the row's 16 weights come out in x's order, and each output's products over its tile
// row stay in its lanes until one horizontal sum.
//
// 3 and 4 bits (`linear_lanes`' groups): a tile's walk is sequential (each state is the previous
// one shifted by kV bits), but tiles are independent, so lane l holds tile g·8 + l of the
// weight's tiles in row-major order. At step t every lane reads its state from the same bit
// offset of its own bitstream (the group's words are transposed once, word-major, so a step's
// window is one aligned load and a uniform shift) and multiplies its weights with its own
// tile's slice of x (laid out per lane once a group); a tile row's 16 outputs are added into y
// when the group is done.
//
// Weights: HYB is one multiply and one gather from the table of (±first, second) fp16 pairs;
// 1MAD/3INST integer arithmetic. Nothing of 2^L entries is read.
#include "trellis_lanes.h"

#ifdef DISCQ_AVX2
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "shares.h"

namespace discq_trellis {
namespace {

constexpr int kLanes = 8;
constexpr int kTile = 16, kTileSize = 256;
constexpr int kMaxWords = 4 * kTileSize / 32;  // 4 bits a weight
constexpr int kRows = 4;                        // activation rows a pass keeps in registers

// Each step's window of L bits lies whole in one of a group's 2W source vectors: word i (bits
// 32i..32i+31 of each lane's stream) or "middle" i (bits 32i+16..32i+47, across two words);
// the state is that vector shifted right by a count all lanes share, then masked.
struct Window {
  int source;     // index into Group::source
  __m128i shift;  // the count, as the shift instructions take it
};

std::vector<Window> windows(int bits, int V, int L) {
  const int kV = bits * V, n_bits = kTileSize * bits, W = n_bits / 32, T = kTileSize / V;
  std::vector<Window> out(T);
  for (int t = 0; t < T; ++t) {
    const int start = ((t + 1) * kV - L + n_bits) % n_bits, i = start >> 5, p = start & 31;
    out[t] = p + L <= 32 ? Window{i, _mm_cvtsi32_si128(32 - p - L)}
                         : Window{W + i, _mm_cvtsi32_si128(48 - p - L)};
  }
  return out;
}

// One group of eight tiles (flat indices tile0 + l, those at or past `end` idle).
struct Group {
  alignas(32) uint32_t source[2 * kMaxWords * kLanes];  // [words, then middles][lane]
  alignas(32) float x[kRows][kTile * kLanes];           // per code's layout, see load_x
  alignas(32) float acc[kRows][kTile][kLanes];          // each lane's sum of each tile row
  int64_t row[kLanes], col[kLanes];                     // the lanes' tile (row, column), -1: idle
};

inline __m256i state(const Group& G, const Window& w, __m256i mask) {
  const auto* v = reinterpret_cast<const __m256i*>(G.source);
  return _mm256_and_si256(_mm256_srl_epi32(_mm256_load_si256(v + w.source), w.shift), mask);
}

void load_words(Group& G, const int32_t* qdata, int64_t tile0, int64_t end, int W, int64_t KT) {
  for (int l = 0; l < kLanes; ++l) {
    const int64_t t = tile0 + l;
    G.row[l] = t < end ? t / KT : -1, G.col[l] = t < end ? t % KT : 0;
    for (int w = 0; w < W; ++w)
      G.source[w * kLanes + l] = t < end ? uint32_t(qdata[t * W + w]) : 0u;
  }
  auto* v = reinterpret_cast<__m256i*>(G.source);
  for (int w = 0; w < W; ++w)  // middle w: the low half of word w, then the high half of w + 1
    v[W + w] = _mm256_or_si256(_mm256_slli_epi32(v[w], 16),
                               _mm256_srli_epi32(v[(w + 1) % W], 16));
}

// x's slice of each lane's tile: V = 2 (HYB): pairs of columns interleaved four lanes a vector,
// [c/2][lanes 0-3, then 4-7][2], matching the converted fp16 pairs; V = 1: [c][lane].
void load_x(Group& G, const float* X, int64_t K, int m0, int rows, int V) {
  for (int m = 0; m < rows; ++m)
    for (int l = 0; l < kLanes; ++l) {
      const float* xl = X + (m0 + m) * K + G.col[l] * kTile;
      for (int c = 0; c < kTile; ++c) {
        const int at = V == 2 ? (c / 2) * 16 + (l / 4) * 8 + (l % 4) * 2 + c % 2 : c * kLanes + l;
        G.x[m][at] = xl[c];
      }
    }
}

// HYB: 2^(Q+1) dwords, entry j = the fp16 pair of table row j mod 2^Q, the first negated when
// j ≥ 2^Q: bits 15-Q..15 of s(s+1) index it directly (bit 15 is the sign).
std::vector<uint32_t> signed_pairs(const uint16_t* lut, int Q) {
  std::vector<uint32_t> out(size_t(2) << Q);
  for (size_t j = 0; j < out.size(); ++j) {
    const size_t r = j & ((size_t(1) << Q) - 1);
    const uint32_t first = lut[2 * r] ^ (j >> Q ? 0x8000u : 0u);
    out[j] = first | (uint32_t(lut[2 * r + 1]) << 16);
  }
  return out;
}

// fp16 halves of eight dwords -> (low halves, high halves) as fp32
inline void halves(__m256i x, __m256& lo, __m256& hi) {
  const __m256i order = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15,
                                         0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
  const __m256i p = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(x, order), 0xD8);
  lo = _mm256_cvtph_ps(_mm256_castsi256_si128(p));
  hi = _mm256_cvtph_ps(_mm256_extracti128_si256(p, 1));
}

// The weights of step t's state in every lane: V = 1 codes
inline __m256 one_mad(__m256i s) {
  const __m256i x = _mm256_add_epi32(_mm256_mullo_epi32(s, _mm256_set1_epi32(34038481)),
                                     _mm256_set1_epi32(76625530));
  const __m256i bytes = _mm256_set1_epi32(0x00FF00FF);
  const __m256i pairs = _mm256_add_epi32(_mm256_and_si256(x, bytes),
                                         _mm256_and_si256(_mm256_srli_epi32(x, 8), bytes));
  const __m256i sum = _mm256_add_epi32(_mm256_and_si256(pairs, _mm256_set1_epi32(0xFFFF)),
                                       _mm256_srli_epi32(pairs, 16));
  return _mm256_div_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(510.f)),
                       _mm256_set1_ps(147.8f));
}

inline __m256 three_inst(__m256i s) {
  const __m256i x = _mm256_xor_si256(
      _mm256_and_si256(_mm256_add_epi32(_mm256_mullo_epi32(s, _mm256_set1_epi32(89226354)),
                                        _mm256_set1_epi32(64248484)),
                       _mm256_set1_epi32(int(0x8FFF8FFFu))),
      _mm256_set1_epi32(0x3B603B60));
  __m256 lo, hi;
  halves(x, lo, hi);
  return _mm256_add_ps(lo, hi);
}

// The group's steps for R rows of x: each tile row's 8 (HYB) or 16 steps summed per lane.
template <int R>
void walk_hyb(Group& G, const Coding& C, const std::vector<Window>& win, const uint32_t* pairs) {
  const __m256i mask = _mm256_set1_epi32((1 << C.L) - 1);
  const __m256i index = _mm256_set1_epi32((2 << C.Q) - 1);
  const __m128i shift = _mm_cvtsi32_si128(15 - C.Q);
  const int* table = reinterpret_cast<const int*>(pairs);
  for (int a = 0; a < kTile; ++a) {
    __m256 lo[R], hi[R];  // lanes 0-3 and 4-7, (first, second) interleaved
    for (int m = 0; m < R; ++m) lo[m] = hi[m] = _mm256_setzero_ps();
    for (int k = 0; k < kTile / 2; ++k) {
      const __m256i s = state(G, win[a * 8 + k], mask);
      const __m256i h = _mm256_mullo_epi32(s, _mm256_add_epi32(s, _mm256_set1_epi32(1)));
      const __m256i idx = _mm256_and_si256(_mm256_srl_epi32(h, shift), index);
      const __m256i p = _mm256_i32gather_epi32(table, idx, 4);
      const __m256 w0 = _mm256_cvtph_ps(_mm256_castsi256_si128(p));
      const __m256 w1 = _mm256_cvtph_ps(_mm256_extracti128_si256(p, 1));
      for (int m = 0; m < R; ++m) {
        lo[m] = _mm256_fmadd_ps(w0, _mm256_load_ps(G.x[m] + k * 16), lo[m]);
        hi[m] = _mm256_fmadd_ps(w1, _mm256_load_ps(G.x[m] + k * 16 + 8), hi[m]);
      }
    }
    // lane sums: hadd gives lanes (0, 1, 4, 5 | 2, 3, 6, 7)
    for (int m = 0; m < R; ++m)
      _mm256_store_ps(G.acc[m][a], _mm256_permutevar8x32_ps(
          _mm256_hadd_ps(lo[m], hi[m]), _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7)));
  }
}

template <int R>
void walk_computed(Group& G, const Coding& C, const std::vector<Window>& win) {
  const __m256i mask = _mm256_set1_epi32((1 << C.L) - 1);
  for (int a = 0; a < kTile; ++a) {
    __m256 acc[R];
    for (int m = 0; m < R; ++m) acc[m] = _mm256_setzero_ps();
    for (int c = 0; c < kTile; ++c) {
      const __m256i s = state(G, win[a * kTile + c], mask);
      const __m256 w = C.code == kOneMad ? one_mad(s) : three_inst(s);
      for (int m = 0; m < R; ++m)
        acc[m] = _mm256_fmadd_ps(w, _mm256_load_ps(G.x[m] + c * kLanes), acc[m]);
    }
    for (int m = 0; m < R; ++m) _mm256_store_ps(G.acc[m][a], acc[m]);
  }
}

template <int R>
void walk(Group& G, const Coding& C, const std::vector<Window>& win, const uint32_t* pairs) {
  if (C.code == kHyb) return walk_hyb<R>(G, C, win, pairs);
  walk_computed<R>(G, C, win);
}

void add_rows(const Group& G, float* Y, int64_t N, int m0, int rows) {
  for (int m = 0; m < rows; ++m)
    for (int l = 0; l < kLanes; ++l) {
      if (G.row[l] < 0) continue;
      float* y = Y + (m0 + m) * N + G.row[l] * kTile;
      for (int a = 0; a < kTile; ++a) y[a] += G.acc[m][a][l];
    }
}

void run_group(Group& G, const Coding& C, const std::vector<Window>& win, const uint32_t* pairs,
               const float* X, float* Y, int64_t M, int64_t K, int64_t N) {
  for (int64_t m0 = 0; m0 < M; m0 += kRows) {
    const int rows = int(std::min<int64_t>(kRows, M - m0));
    load_x(G, X, K, int(m0), rows, C.V);
    switch (rows) {
      case 1: walk<1>(G, C, win, pairs); break;
      case 2: walk<2>(G, C, win, pairs); break;
      case 3: walk<3>(G, C, win, pairs); break;
      default: walk<4>(G, C, win, pairs);
    }
    add_rows(G, Y, N, int(m0), rows);
  }
}

// ---- 2 bits a weight: the lanes are one tile row's steps --------------------------------------
// With 2 bits a weight, all steps of tile row a (8 for HYB, 16 for 1MAD/3INST) read their
// states from words a − 1 and a of the tile's stream (tail-biting: word −1 is the last): step
// k's state is the 64-bit (w[a−1], w[a]) shifted right by r_k = 28 − 4k (HYB; 30 − 2k for one
// weight a step), then masked. So a row's states are two broadcast words under per-lane shifts,
// its weights come out as the row's 16 weights in order, and x is read as it is; each output's
// products over the tile row's K/16 tiles stay in its lanes until one horizontal sum.

struct RowShifts {
  __m256i left[2], right[2];  // per lane: hi << left | lo >> right (counts of 32 give zero)
};

RowShifts row_shifts(int per_step) {  // bits a step: 4 (HYB) or 2
  RowShifts S;
  for (int v = 0; v < 2; ++v) {
    alignas(32) int32_t l[8], r[8];
    for (int k = 0; k < 8; ++k) {
      const int rk = 32 - per_step - per_step * (v * 8 + k);
      l[k] = rk > 0 ? 32 - rk : 32, r[k] = rk > 0 ? rk : 0;
    }
    S.left[v] = _mm256_load_si256(reinterpret_cast<const __m256i*>(l));
    S.right[v] = _mm256_load_si256(reinterpret_cast<const __m256i*>(r));
  }
  return S;
}

inline __m256i row_states(int32_t hi, int32_t lo, const RowShifts& S, int v, __m256i mask) {
  return _mm256_and_si256(_mm256_or_si256(_mm256_sllv_epi32(_mm256_set1_epi32(hi), S.left[v]),
                                          _mm256_srlv_epi32(_mm256_set1_epi32(lo), S.right[v])),
                          mask);
}

// y[m, 16i + a] for the tile row i, R rows of x; the row's 16 weights of a tile as (w0, w1)
template <int R>
void tile_row(const Coding& C, const int32_t* q, int64_t KT, const uint32_t* pairs,
              const RowShifts& S, const float* X, int64_t K, float* Y, int64_t N, int64_t i) {
  const __m256i mask = _mm256_set1_epi32((1 << C.L) - 1);
  const __m256i index = _mm256_set1_epi32((2 << C.Q) - 1);
  const __m128i shift = _mm_cvtsi32_si128(15 - C.Q);
  const int* table = reinterpret_cast<const int*>(pairs);
  for (int a = 0; a < kTile; ++a) {
    __m256 acc[R][2];
    for (int m = 0; m < R; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int64_t j = 0; j < KT; ++j) {
      const int32_t* w = q + (i * KT + j) * (kTileSize / 16);  // 16 words a tile
      const int32_t hi = w[(a + 15) & 15], lo = w[a];
      __m256 w0, w1;
      if (C.code == kHyb) {
        const __m256i s = row_states(hi, lo, S, 0, mask);
        const __m256i h = _mm256_mullo_epi32(s, _mm256_add_epi32(s, _mm256_set1_epi32(1)));
        const __m256i p = _mm256_i32gather_epi32(
            table, _mm256_and_si256(_mm256_srl_epi32(h, shift), index), 4);
        w0 = _mm256_cvtph_ps(_mm256_castsi256_si128(p));
        w1 = _mm256_cvtph_ps(_mm256_extracti128_si256(p, 1));
      } else {
        const __m256i s0 = row_states(hi, lo, S, 0, mask), s1 = row_states(hi, lo, S, 1, mask);
        w0 = C.code == kOneMad ? one_mad(s0) : three_inst(s0);
        w1 = C.code == kOneMad ? one_mad(s1) : three_inst(s1);
      }
      for (int m = 0; m < R; ++m) {
        const float* x = X + m * K + j * kTile;
        acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x), acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + 8), acc[m][1]);
      }
    }
    for (int m = 0; m < R; ++m)
      Y[m * N + i * kTile + a] = discq_simd::hsum(_mm256_add_ps(acc[m][0], acc[m][1]));
  }
}

void linear_rows(const Coding& C, const uint32_t* pairs, const float* X, const int32_t* q,
                 float* Y, int64_t M, int64_t K, int64_t NT, int64_t KT) {
  const RowShifts S = row_shifts(C.bits * C.V);
  const int64_t N = NT * kTile;
  discq_shares::for_chunks(NT, 1, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t m0 = 0; m0 < M; m0 += kRows) {
        const float* x = X + m0 * K;
        float* y = Y + m0 * N;
        switch (std::min<int64_t>(kRows, M - m0)) {
          case 1: tile_row<1>(C, q, KT, pairs, S, x, K, y, N, i); break;
          case 2: tile_row<2>(C, q, KT, pairs, S, x, K, y, N, i); break;
          case 3: tile_row<3>(C, q, KT, pairs, S, x, K, y, N, i); break;
          default: tile_row<4>(C, q, KT, pairs, S, x, K, y, N, i);
        }
      }
  });
}

}  // namespace

bool linear_lanes(const Coding& C, const uint16_t* lut, const float* X, const int32_t* qdata,
                  float* Y, int64_t M, int64_t K, int64_t NT, int64_t KT) {
  const int W = kTileSize * C.bits / 32;
  if (W > kMaxWords || (C.code == kHyb && (C.V != 2 || lut == nullptr)) ||
      (C.code != kHyb && C.V != 1))
    return false;
  const std::vector<uint32_t> pairs = C.code == kHyb ? signed_pairs(lut, C.Q)
                                                     : std::vector<uint32_t>();
  if (C.bits == 2) {
    linear_rows(C, pairs.data(), X, qdata, Y, M, K, NT, KT);
    return true;
  }
  const std::vector<Window> win = windows(C.bits, C.V, C.L);
  // whole tile rows a chunk, so no two threads add into the same outputs; a chunk's last group
  // may be partly idle
  discq_shares::for_chunks(NT, 2, 2, [&](int64_t i0, int64_t i1) {
    Group G;
    for (int64_t t = i0 * KT; t < i1 * KT; t += kLanes) {
      load_words(G, qdata, t, i1 * KT, W, KT);
      run_group(G, C, win, pairs.data(), X, Y, M, K, NT * kTile);
    }
  });
  return true;
}

}  // namespace discq_trellis

#else

namespace discq_trellis {
bool linear_lanes(const Coding&, const uint16_t*, const float*, const int32_t*, float*, int64_t,
                  int64_t, int64_t, int64_t) {
  return false;
}
}  // namespace discq_trellis

#endif
