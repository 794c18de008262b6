// Fused selective scan on CPU: forward (initial state in, final state out) and backward.
//
// Shapes (see ops/scan.py): x, delta, z (b, l, d) with unit stride along d; B, C (b, l, n);
// A (d, n); D (d,); states (b, d, n). Channels are vectorised: a "block" is one vector of `lanes`
// channels, its state n vectors. Work items are (batch row, range of up to kForwardRange blocks); an
// item walks time in the outer loop and its blocks in the inner loop, so every step reads contiguous
// pieces of the x / delta / z rows. Ranges are as long as the threads allow (up to 64 blocks, whole
// rows at D = 1024): the states (64 KiB for n = 16) then live in L2, not L1, but each input is read
// as one sequential stream, which the hardware prefetcher follows (shorter ranges, a quarter row per step,
// were slower at L >= 1024: docs/benchmarks.md).
//
// Backward: the forward saves the state at the start of every chunk of kChunk steps. The backward
// walks the chunks in reverse; for each chunk it recomputes the states and decay factors
// a_t = exp(delta_t A) into a scratch buffer, then runs the adjoint recurrence
// h_t = g_t C_t + a_{t+1} h_{t+1} backwards in time. dB_t and dC_t (sums over channels) are
// accumulated over the item's blocks lane-wise and reduced across lanes once per step; each range
// writes its own partial sums, which the caller adds (so results do not depend on thread timing).

#include "scan.h"

namespace bm {
namespace scan {

// Software prefetch of the range's piece of a row, kPrefetch steps ahead.
constexpr int kPrefetch = 4;

template <typename S, typename T> inline void prefetch_rows(const T* row, Range rg, int64_t d) {
  const char* lo = reinterpret_cast<const char*>(row + std::min(d, rg.lo * lanes<S>));
  const char* hi = reinterpret_cast<const char*>(row + std::min(d, rg.hi * lanes<S>));
  for (const char* p = lo; p < hi; p += 64) __builtin_prefetch(p);
}

// ------------------------------------------------------------------------------------------ forward
template <typename S, typename TX, typename TD, int NS>
void forward_range(const Args<S, TX, TD>& a, TX* y, S* final_state, int64_t bi, Range rg) {
  using V = Vec<S>;
  constexpr int NM = NS ? NS : kMaxState;
  const int n = NS ? NS : static_cast<int>(a.n);
  const int64_t nb = rg.hi - rg.lo;
  if (nb <= 0) return;
  const int64_t nchunk = (a.l + kChunk - 1) / kChunk;
  VecBuf<S> At = vec_buffer<S>(nb * n), state = vec_buffer<S>(nb * n), Dv = vec_buffer<S>(nb);
  load_scaled_A<S>(At.get(), a.A, rg, a.d, n);
  for (int64_t blk = rg.lo; blk < rg.hi; ++blk) {
    const auto [d0, cnt] = block_of<S>(blk, a.d);
    if (a.init) load_transposed<S>(state.get() + (blk - rg.lo) * n, a.init + bi * a.d * n, d0, cnt, n);
    if (a.D) Dv[blk - rg.lo] = vload<S>(a.D + d0, cnt);
  }
  for (int64_t t = 0; t < a.l; ++t) {
    if (a.ckpt && t % kChunk == 0) {
      V* ck = reinterpret_cast<V*>(a.ckpt) + ((bi * nchunk + t / kChunk) * a.nblk + rg.lo) * n;
      std::copy(state.get(), state.get() + nb * n, ck);
    }
    const TD* drow = a.delta.at(bi, t);
    const TX* xrow = a.x.at(bi, t);
    const TX* zrow = a.z.p ? a.z.at(bi, t) : nullptr;
    const S* Bt = a.B.at(bi, t);
    const S* Ct = a.C.at(bi, t);
    TX* yrow = y + (bi * a.l + t) * a.d;
    if (t + kPrefetch < a.l) {  // each step starts a new 4 KiB page of every row: no hardware prefetch
      prefetch_rows<S>(a.delta.at(bi, t + kPrefetch), rg, a.d);
      prefetch_rows<S>(a.x.at(bi, t + kPrefetch), rg, a.d);
      if (zrow) prefetch_rows<S>(a.z.at(bi, t + kPrefetch), rg, a.d);
    }
    for (int64_t j = 0; j < nb; ++j) {
      const auto [d0, cnt] = block_of<S>(rg.lo + j, a.d);
      const V dl = vload_as<S>(drow + d0, cnt);
      const V xv = vload_as<S>(xrow + d0, cnt);
      const V dx = dl * xv;
      V* s = state.get() + j * n;
      const V* Aj = At.get() + j * n;
      V acc = Dv[j] * xv;
#pragma GCC unroll 16
      for (int k = 0; k < NM; ++k) {
        if (k >= n) break;
        const V sk = vexp2(dl * Aj[k]) * s[k] + dx * Bt[k];
        s[k] = sk;
        acc += sk * Ct[k];
      }
      if (zrow) {
        const V zv = vload_as<S>(zrow + d0, cnt);
        acc *= zv * vsigmoid(zv);
      }
      vstore_as<S>(yrow + d0, acc, cnt);
    }
  }
  for (int64_t blk = rg.lo; blk < rg.hi; ++blk) {
    const auto [d0, cnt] = block_of<S>(blk, a.d);
    store_transposed<S>(final_state + bi * a.d * n, state.get() + (blk - rg.lo) * n, d0, cnt, n);
  }
}

}  // namespace scan
}  // namespace bm

extern "C" {

int bm_vector_bytes() { return bm::kVecBytes; }
int bm_scan_chunk() { return bm::scan::kChunk; }
int bm_scan_max_state() { return bm::scan::kMaxState; }

// How many ranges of channel blocks to split d channels into for the forward (forward = 1) or the
// backward: ranges of at most kForwardRange / kRange blocks, and enough work items (batch rows x
// ranges) to occupy `threads` threads.
int64_t bm_scan_ranges(int64_t b, int64_t d, int elem_bytes, int threads, int forward) {
  const int64_t nblk = (d + bm::kVecBytes / elem_bytes - 1) / (bm::kVecBytes / elem_bytes);
  const int64_t most = forward ? bm::scan::kForwardRange : bm::scan::kRange;
  const int64_t by_size = (nblk + most - 1) / most;
  const int64_t by_threads = (threads + b - 1) / std::max<int64_t>(b, 1);
  return std::max<int64_t>(1, std::min(nblk, std::max(by_size, by_threads)));
}

// y (b, l, d) contiguous of x's dtype; final_state (b, d, n); ckpt (b, nchunk, nblk, n, lanes) or null.
// Work items: batch rows x `ranges` ranges of channel blocks (see bm_scan_ranges).
int bm_scan_forward(const bm::scan::Tensors* t, void* y, void* final_state, void* ckpt, int64_t ranges,
                    int threads) {
  using namespace bm;
  using namespace bm::scan;
  if (t->n > kMaxState || ranges < 1) return 1;
  const bool ok = dispatch_types(*t, [&]<typename S, typename TX, typename TD, int NS>() {
    const auto a = make_args<S, TX, TD>(*t, ckpt);
    TX* yp = static_cast<TX*>(y);
    S* fp = static_cast<S*>(final_state);
    parallel_for(a.b * ranges, threads, [&](int64_t i) {
      forward_range<S, TX, TD, NS>(a, yp, fp, i / ranges, range_of(i % ranges, a.nblk, ranges));
    });
  });
  return ok ? 0 : 2;
}

}  // extern "C"
