// discq::e8p_encode_cpu: the exact nearest E8P point of each 8-vector (and, below,
// discq::nearest_cpu for small codebooks), the search of
// tensors/e8p.py (`encode`) in one pass per vector instead of ~40 tensor operations over the
// whole batch. QuIP#'s BlockLDLQ calls it once per 8 columns with a few thousand vectors, so
// on CPU the torch version is dominated by per-operation overhead.
//
// Per vector y and per shift (point = x + 1/4 with code bit 15 = 0, or x − 1/4 with bit 15 = 1;
// z = y ∓ 1/4 is searched against the unshifted codebook):
//   fast path: the nearest point f of the coset D̂8 = {x ∈ (ℤ + ½)^8 : Σx even} (round each
//   coordinate to the nearest odd multiple of ½; if Σf is odd, re-round the coordinate nearest
//   to a tie the other way). If its |f| is one of the 256 patterns, it is the shift's answer;
//   the lattice distance is a lower bound for the other shift, so the vector is done when the
//   shift with the smaller lattice distance (or both) lands in the codebook.
//   otherwise: all 256 patterns. With free signs, pattern a's best point takes the signs of z
//   (distance ‖z‖² + ‖a‖² − 2 a·|z|); when that sign count has the wrong parity, the cheapest
//   fix flips the coordinate with the smallest a_i|z_i| (adding 4·min_i a_i|z_i|).
// Code = pattern | signs of coordinates 0–6 << 8 | shift << 15 (e8p.py's layout).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr int D = 8;     // coordinates per vector
constexpr int NP = 256;  // absolute-value patterns
constexpr float SHIFT = 0.25f;

struct Table {
  float At[D][NP];    // pattern a's coordinate i at At[i][a] (the loops run over a)
  float norm2[NP];    // ‖a‖²
  int parity[NP];     // Σ a_i mod 2: the number of negative signs a point must have
  const int64_t* index;  // base-4 key of |f| − ½ -> pattern number or −1 ([4^8])
};

struct Pick {
  float d;      // squared distance to z (the shift's searched vector)
  int pattern;  // −1: none in the codebook
  int neg;      // sign bits of the point, coordinate i at bit i
};

// Nearest point of D̂8 to z; its pattern number if it is in the codebook.
Pick lattice_nearest(const float* z, const Table& T) {
  float f[D], err[D];
  int64_t floors = 0;
  int j = 0;
  for (int i = 0; i < D; ++i) {
    const float fl = std::floor(z[i]);
    floors += static_cast<int64_t>(fl);
    f[i] = fl + 0.5f;
    err[i] = z[i] - f[i];
    if (std::fabs(err[i]) > std::fabs(err[j])) j = i;  // first of the largest, as argmax
  }
  if (floors & 1) f[j] += err[j] >= 0 ? 1.0f : -1.0f;  // Σf = Σfloor + 4: odd with Σfloor
  Pick p{0.0f, -1, 0};
  int64_t key = 0, scale = 1;
  bool inside = true;
  for (int i = 0; i < D; ++i, scale *= 4) {
    const float e = z[i] - f[i];
    p.d += e * e;
    const int64_t digit = static_cast<int64_t>(std::fabs(f[i]) - 0.5f);
    inside = inside && digit <= 3;
    key += (digit < 3 ? digit : 3) * scale;
    p.neg |= (f[i] < 0) << i;
  }
  p.pattern = inside ? static_cast<int>(T.index[key]) : -1;
  return p;
}

// Nearest point of the unshifted codebook to z, trying all 256 patterns.
Pick brute(const float* z, const Table& T) {
  float az[D], dist[NP], cost[NP];
  int neg = 0, negs = 0;
  float z2 = 0;
  for (int i = 0; i < D; ++i) {
    az[i] = std::fabs(z[i]);
    neg |= (z[i] < 0) << i;
    negs += z[i] < 0;
    z2 += z[i] * z[i];
  }
  for (int a = 0; a < NP; ++a) {
    dist[a] = T.norm2[a];
    cost[a] = std::numeric_limits<float>::infinity();
  }
  for (int i = 0; i < D; ++i)
    for (int a = 0; a < NP; ++a) {  // vectorized over patterns
      const float t = az[i] * T.At[i][a];
      dist[a] -= 2 * t;
      cost[a] = t < cost[a] ? t : cost[a];
    }
  int best = 0;
  float best_d = std::numeric_limits<float>::infinity();
  for (int a = 0; a < NP; ++a) {
    const float d = ((negs ^ T.parity[a]) & 1) ? dist[a] + 4 * cost[a] : dist[a];
    if (d < best_d) best_d = d, best = a;
  }
  if ((negs ^ T.parity[best]) & 1) {  // flip the sign where it costs least
    int at = 0;
    for (int i = 1; i < D; ++i)
      if (az[i] * T.At[i][best] < az[at] * T.At[at][best]) at = i;
    neg ^= 1 << at;
  }
  return {best_d + z2, best, neg};
}

int64_t code_of(const Pick& p, bool minus) {
  return p.pattern | (static_cast<int64_t>(p.neg & 0x7F) << 8) | (int64_t{minus} << 15);
}

int64_t encode_one(const float* y, const Table& T) {
  float zp[D], zm[D];
  for (int i = 0; i < D; ++i) zp[i] = y[i] - SHIFT, zm[i] = y[i] + SHIFT;
  const Pick p = lattice_nearest(zp, T), m = lattice_nearest(zm, T);
  const bool in_p = p.pattern >= 0, in_m = m.pattern >= 0;
  if ((in_p && p.d <= m.d) || (in_m && m.d <= p.d) || (in_p && in_m)) {
    const bool use_m = in_m && (!in_p || m.d < p.d);
    return use_m ? code_of(m, true) : code_of(p, false);
  }
  const Pick bp = brute(zp, T), bm = brute(zm, T);
  return bm.d < bp.d ? code_of(bm, true) : code_of(bp, false);
}

// y: [M, 8] float32, patterns: [256, 8] float32 (the |x| patterns), index: [4^8] int64
// -> codes [M] int64.
at::Tensor e8p_encode_cpu(const at::Tensor& y, const at::Tensor& patterns,
                          const at::Tensor& index) {
  TORCH_CHECK(y.dim() == 2 && y.size(1) == D && y.scalar_type() == at::kFloat,
              "y must be [M, 8] float32");
  TORCH_CHECK(patterns.sizes() == at::IntArrayRef({NP, D}) &&
                  patterns.scalar_type() == at::kFloat,
              "patterns must be [256, 8] float32");
  TORCH_CHECK(index.numel() == 65536 && index.scalar_type() == at::kLong,
              "index must be [65536] int64");
  const at::Tensor yc = y.contiguous(), pc = patterns.contiguous(), ic = index.contiguous();
  Table T;
  const float* P = pc.data_ptr<float>();
  for (int a = 0; a < NP; ++a) {
    float n2 = 0, s = 0;
    for (int i = 0; i < D; ++i) {
      T.At[i][a] = P[a * D + i];
      n2 += P[a * D + i] * P[a * D + i];
      s += P[a * D + i];
    }
    T.norm2[a] = n2;
    T.parity[a] = static_cast<int>(std::lround(s)) & 1;
  }
  T.index = ic.data_ptr<int64_t>();
  at::Tensor codes = at::empty({y.size(0)}, y.options().dtype(at::kLong));
  const float* yp = yc.data_ptr<float>();
  int64_t* out = codes.data_ptr<int64_t>();
  at::parallel_for(0, y.size(0), 512, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) out[m] = encode_one(yp + m * D, T);
  });
  return codes;
}

// discq::nearest_cpu: the nearest of P points (any small codebook: the 1-bit E8 code of
// QuIP#'s 3-bit residual stage) by exhaustive search, argmin_p ‖p‖² − 2 y·p, the first on ties.
// y: [M, d] float32, points: [P, d] float32 -> [M] int64.
at::Tensor nearest_cpu(const at::Tensor& y, const at::Tensor& points) {
  TORCH_CHECK(y.dim() == 2 && points.dim() == 2 && y.size(1) == points.size(1) &&
                  y.scalar_type() == at::kFloat && points.scalar_type() == at::kFloat,
              "y [M, d] and points [P, d] must be float32 with the same d");
  const int64_t d = y.size(1), P = points.size(0);
  TORCH_CHECK(P > 0, "points must not be empty");
  const at::Tensor pt = points.t().contiguous(), yc = y.contiguous();  // pt: [d, P]
  std::vector<float> norm2(P, 0.0f);
  const float* pp = pt.data_ptr<float>();
  for (int64_t i = 0; i < d; ++i)
    for (int64_t p = 0; p < P; ++p) norm2[p] += pp[i * P + p] * pp[i * P + p];
  at::Tensor codes = at::empty({y.size(0)}, y.options().dtype(at::kLong));
  const float* yp = yc.data_ptr<float>();
  int64_t* out = codes.data_ptr<int64_t>();
  at::parallel_for(0, y.size(0), 256, [&](int64_t m0, int64_t m1) {
    std::vector<float> dist(P);
    for (int64_t m = m0; m < m1; ++m) {
      std::copy(norm2.begin(), norm2.end(), dist.begin());
      for (int64_t i = 0; i < d; ++i) {
        const float t = -2 * yp[m * d + i];
        for (int64_t p = 0; p < P; ++p) dist[p] += t * pp[i * P + p];  // vectorized over p
      }
      int64_t best = 0;
      for (int64_t p = 1; p < P; ++p)
        if (dist[p] < dist[best]) best = p;
      out[m] = best;
    }
  });
  return codes;
}

}  // namespace

TORCH_LIBRARY_IMPL(discq, CPU, m) {
  m.impl("e8p_encode_cpu", &e8p_encode_cpu);
  m.impl("nearest_cpu", &nearest_cpu);
}
