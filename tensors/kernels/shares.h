// Output channels split across threads for the short calls of a decode step.
//
// Each thread owns a contiguous share of the channels and claims it `chunk` channels at a time
// from the share's counter; a thread done with its share claims from the others'. A decode step
// is ~200 calls of tens of microseconds, and a thread that joins a call late (woken from its
// wait, or busy elsewhere) then leaves its remaining chunks to the others instead of keeping
// them waiting at the end of the parallel region. Owned shares keep each thread's weight rows
// one long stream: chunks dealt out in turn measured slower (the hardware prefetcher restarts at
// every chunk).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

namespace discq_shares {

struct alignas(64) Share {  // one cache line each: the counters are written by every thread
  std::atomic<int64_t> next;
  int64_t end;
};

// fn(n0, n1) for disjoint [n0, n1) covering [0, N), at most `chunk` wide; one thread when N is
// at most `serial` (a parallel region costs more than such a call).
template <typename F>
void for_chunks(int64_t N, int64_t chunk, int64_t serial, const F& fn) {
  const int64_t chunks = (N + chunk - 1) / chunk;
  const int64_t T = N <= serial ? 1 : std::min<int64_t>(at::get_num_threads(), chunks);
  if (T <= 1) return fn(int64_t{0}, N);
  std::vector<Share> share(T);
  for (int64_t t = 0; t < T; ++t) {
    share[t].next = t * chunks / T;
    share[t].end = (t + 1) * chunks / T;
  }
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t) {
    for (int64_t u = 0; u < T; ++u) {
      Share& sh = share[(t0 + u) % T];
      for (int64_t c = sh.next++; c < sh.end; c = sh.next++)
        fn(c * chunk, std::min(N, (c + 1) * chunk));
    }
  });
}

}  // namespace discq_shares
