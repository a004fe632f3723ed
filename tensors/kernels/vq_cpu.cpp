// discq::vq_linear_cpu: y = x Ŵᵀ for vector-codebook weights (GPTVQ; layout in tensors/vq.py),
// for few activation rows; the dense weight is never written. The int8 codebooks are scaled to
// floats once a call (a few KB). For one activation row (and no block scales) the
// products of the activations with every codeword are tabulated and each weight vector costs
// one lookup (lut_linear); otherwise each weight row is decoded into a row buffer — its packed
// indices unpacked (a run of 8 indices is bits·dim bytes), one codebook lookup a vector, the
// block scales applied — and dotted with every activation row.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <vector>

namespace {

constexpr int kRun = 8;  // indices per packed run (tensors/packing.py)

struct VqLayout {
  int64_t N, K, GR, GC, E, dim, ib, width, scale_block, scale_width;
};

// The indices of a packed row into idx[V]: runs of 8 indices in IB little-endian bytes, index
// i of a run at bit IB·i; 8-bit indices are plain bytes. IB is a template argument so the
// shifts and masks are constants.
template <int IB>
void unpack_row(const uint8_t* row, int64_t V, uint8_t* idx) {
  if constexpr (IB == 8) {
    std::memcpy(idx, row, V);
  } else {
    constexpr uint64_t mask = (uint64_t{1} << IB) - 1;
    for (int64_t r = 0; r * kRun < V; ++r) {
      uint64_t word = 0;
      std::memcpy(&word, row + r * IB, IB);  // little-endian host (x86, arm64)
      uint8_t run[kRun];
      for (int i = 0; i < kRun; ++i) run[i] = uint8_t((word >> (IB * i)) & mask);
      std::memcpy(idx + r * kRun, run, std::min<int64_t>(kRun, V - r * kRun));
    }
  }
}

void unpack_indices(int ib, const uint8_t* row, int64_t V, uint8_t* idx) {
  switch (ib) {
    case 1: return unpack_row<1>(row, V, idx);
    case 2: return unpack_row<2>(row, V, idx);
    case 3: return unpack_row<3>(row, V, idx);
    case 4: return unpack_row<4>(row, V, idx);
    case 5: return unpack_row<5>(row, V, idx);
    case 6: return unpack_row<6>(row, V, idx);
    case 7: return unpack_row<7>(row, V, idx);
    default: return unpack_row<8>(row, V, idx);
  }
}

// Codewords of vectors [v0, v1) from one codebook `tab` [E, D] into w.
template <int D>
void gather(const float* tab, const uint8_t* idx, int64_t v0, int64_t v1, float* w) {
  for (int64_t v = v0; v < v1; ++v)
    for (int t = 0; t < D; ++t) w[v * D + t] = tab[idx[v] * D + t];
}

// Row n of Ŵ into w[K] (idx[V] scratch): tables are the scaled codebooks [GR, GC, E, dim].
void decode_row(const VqLayout& P, const float* tables, const uint8_t* q, const uint8_t* bs,
                int64_t n, uint8_t* idx, float* w) {
  const int64_t V = P.K / P.dim, Vg = P.K / P.GC / P.dim, rg = n / (P.N / P.GR);
  unpack_indices(int(P.ib), q + n * P.width, V, idx);
  for (int64_t g = 0; g < P.GC; ++g) {  // one codebook per column group of this row's group
    const float* tab = tables + (rg * P.GC + g) * P.E * P.dim;
    if (P.dim == 1) gather<1>(tab, idx, g * Vg, (g + 1) * Vg, w);
    else if (P.dim == 2) gather<2>(tab, idx, g * Vg, (g + 1) * Vg, w);
    else gather<4>(tab, idx, g * Vg, (g + 1) * Vg, w);
  }
  if (bs == nullptr) return;
  const int64_t B = P.K / P.scale_block;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t i = n * B + b;  // one sequence over the rows, two 4-bit exponents a byte
    const int e = (bs[i / 2] >> (4 * (i % 2))) & 15;
    // 2^(−e/2) as tensors/vq.py forms it: an exact power of two, times float32(√½) if e is odd
    const float f = std::ldexp(1.0f, -(e / 2)) * ((e & 1) ? 0.70710677f : 1.0f);
    for (int64_t t = 0; t < P.scale_block; ++t) w[b * P.scale_block + t] *= f;
  }
}

// Few activation rows (decode), no block scales: inner products of each activation vector with
// every codeword, then one table lookup and add per weight vector instead of decoding it. For a
// tile of rows of one row group and each column group g (codebook C_g, Vg vectors):
//   lut[m][v][e] = Σ_t x[m, (g·Vg + v)·D + t] · C_g[e, t],   y[m, n] += Σ_v lut[m][v][idx[n, v]]
// The table (Vg·E floats a row of x) is built once for the tile's rows.
constexpr int64_t kLutRows = 64;  // weight rows sharing one table
// Above this many activation rows, decode rows instead: the tables cost grows with the rows of
// x, a decoded weight row does not (measured on SmolLM2's shapes: at one row the tables take
// half the time of decoding, at two rows they are even, at four over twice the time).
constexpr int64_t kLutMaxM = 1;

struct LutScratch {
  std::vector<uint8_t> idx;
  std::vector<float> lut, acc;
};

void lut_tile(const VqLayout& P, const float* tablesT, const uint8_t* q, const float* X,
              int64_t M, int64_t n0, int64_t n1, float* Y, LutScratch& S) {
  const int64_t V = P.K / P.dim, Vg = V / P.GC, rg = n0 / (P.N / P.GR), R = n1 - n0, E = P.E;
  S.idx.resize(R * V);
  S.lut.resize(M * Vg * E);
  S.acc.assign(M * R, 0.f);
  for (int64_t r = 0; r < R; ++r) unpack_indices(int(P.ib), q + (n0 + r) * P.width, V,
                                                 S.idx.data() + r * V);
  for (int64_t g = 0; g < P.GC; ++g) {
    const float* tab = tablesT + (rg * P.GC + g) * P.dim * E;  // [D, E]
    for (int64_t m = 0; m < M; ++m)
      for (int64_t v = 0; v < Vg; ++v) {
        const float* xv = X + m * P.K + (g * Vg + v) * P.dim;
        float* L = S.lut.data() + (m * Vg + v) * E;
#pragma omp simd
        for (int64_t e = 0; e < E; ++e) L[e] = xv[0] * tab[e];
        for (int64_t t = 1; t < P.dim; ++t)
#pragma omp simd
          for (int64_t e = 0; e < E; ++e) L[e] += xv[t] * tab[t * E + e];
      }
    for (int64_t r = 0; r < R; ++r) {
      const uint8_t* ir = S.idx.data() + r * V + g * Vg;
      for (int64_t m = 0; m < M; ++m) {
        const float* L = S.lut.data() + m * Vg * E;
        float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;  // four chains: loads overlap
        int64_t v = 0;
        for (; v + 4 <= Vg; v += 4) {
          a0 += L[v * E + ir[v]];
          a1 += L[(v + 1) * E + ir[v + 1]];
          a2 += L[(v + 2) * E + ir[v + 2]];
          a3 += L[(v + 3) * E + ir[v + 3]];
        }
        for (; v < Vg; ++v) a0 += L[v * E + ir[v]];
        S.acc[m * R + r] += (a0 + a1) + (a2 + a3);
      }
    }
  }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t r = 0; r < R; ++r) Y[m * P.N + n0 + r] = S.acc[m * R + r];
}

void lut_linear(const VqLayout& P, const float* tables, const uint8_t* q, const float* X,
                int64_t M, float* Y) {
  const int64_t Rg = P.N / P.GR, per_group = (Rg + kLutRows - 1) / kLutRows;
  std::vector<float> tablesT(P.GR * P.GC * P.E * P.dim);  // each codebook as [D, E]
  for (int64_t c = 0; c < P.GR * P.GC; ++c)
    for (int64_t e = 0; e < P.E; ++e)
      for (int64_t t = 0; t < P.dim; ++t)
        tablesT[(c * P.dim + t) * P.E + e] = tables[(c * P.E + e) * P.dim + t];
  at::parallel_for(0, P.GR * per_group, 1, [&](int64_t i0, int64_t i1) {
    LutScratch S;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n0 = (i / per_group) * Rg + (i % per_group) * kLutRows;
      lut_tile(P, tablesT.data(), q, X, M, n0, std::min(n0 + kLutRows, (i / per_group + 1) * Rg),
               Y, S);
    }
  });
}

at::Tensor vq_linear_cpu(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& codebook,
                         const at::Tensor& scale, const std::optional<at::Tensor>& block_scale,
                         int64_t bits, int64_t dim, int64_t scale_block) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be [M, K] float32");
  TORCH_CHECK(qdata.dim() == 2 && qdata.scalar_type() == at::kByte, "qdata must be uint8 [N, W]");
  TORCH_CHECK(codebook.dim() == 4 && codebook.scalar_type() == at::kChar &&
                  codebook.size(3) == dim,
              "codebook must be int8 [GR, GC, E, dim]");
  TORCH_CHECK(bits * dim <= 8, "indices have at most 8 bits");
  const auto xc = x.contiguous(), qc = qdata.contiguous();
  VqLayout P{qdata.size(0), x.size(1), codebook.size(0), codebook.size(1), codebook.size(2),
             dim, bits * dim, qdata.size(1), scale_block, 0};
  const int64_t V = P.K / dim;
  TORCH_CHECK(P.K % dim == 0 && P.N % P.GR == 0 && P.K % P.GC == 0 && P.E == (1 << P.ib),
              "codebook groups must tile the weight");
  TORCH_CHECK(P.width == (P.ib == 8 ? V : (V + kRun - 1) / kRun * P.ib),
              "qdata's width does not match K / dim indices of bits * dim bits");
  TORCH_CHECK(scale.scalar_type() == at::kHalf && scale.numel() == P.GR * P.GC,
              "scale must be float16 [GR, GC]");
  const auto cbc = codebook.contiguous(), sc = scale.contiguous();
  std::vector<float> tables(P.GR * P.GC * P.E * dim);  // the scaled codebooks, a few KB
  const int8_t* cb = cbc.data_ptr<int8_t>();
  const c10::Half* s = sc.data_ptr<c10::Half>();
  for (int64_t i = 0; i < int64_t(tables.size()); ++i)
    tables[i] = float(cb[i]) * float(s[i / (P.E * dim)]);
  at::Tensor bsc;
  const uint8_t* bs = nullptr;
  if (block_scale.has_value()) {
    TORCH_CHECK(scale_block > 0 && P.K % scale_block == 0, "scale_block must divide K");
    bsc = block_scale->contiguous();
    bs = bsc.data_ptr<uint8_t>();
    P.scale_width = bsc.size(1);
    TORCH_CHECK(bsc.dim() == 2 && bsc.size(0) == 1 &&
                    P.scale_width == (P.N * (P.K / scale_block) + kRun - 1) / kRun * 4,
                "block_scale must be uint8 [1, packed 4-bit exponents]");
  }
  const int64_t M = x.size(0);
  auto y = at::empty({M, P.N}, x.options());
  const float* X = xc.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const float* T = tables.data();
  const uint8_t* Q = qc.data_ptr<uint8_t>();
  if (M <= kLutMaxM && bs == nullptr) {
    lut_linear(P, T, Q, X, M, Y);
    return y;
  }
  at::parallel_for(0, P.N, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> w(P.K);
    std::vector<uint8_t> idx(P.K / P.dim);
    for (int64_t n = n0; n < n1; ++n) {
      decode_row(P, T, Q, bs, n, idx.data(), w.data());
      for (int64_t m = 0; m < M; ++m) {
        const float* xm = X + m * P.K;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t k = 0; k < P.K; ++k) acc += w[k] * xm[k];
        Y[m * P.N + n] = acc;
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(discq, CPU, m) { m.impl("vq_linear_cpu", &vq_linear_cpu); }
