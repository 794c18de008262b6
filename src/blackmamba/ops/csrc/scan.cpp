// Fused selective scan on CPU: forward (initial state in, final state out) and backward.
//
// Shapes (see ops/scan.py): x, delta, z (b, l, d) with unit stride along d; B, C (b, l, n);
// A (d, n); D (d,); states (b, d, n). Channels are vectorised: a "block" is one vector of `lanes`
// channels, its state n vectors. Work items are (batch row, range of up to kRange blocks); an item
// walks time in the outer loop and its blocks in the inner loop, so every step reads contiguous
// pieces of the x / delta / z rows, and its states (kRange * n vectors, 16 KiB for n = 16) stay
// in L1.
//
// Backward: the forward saves the state at the start of every chunk of kChunk steps. The backward
// walks the chunks in reverse; for each chunk it recomputes the states and decay factors
// a_t = exp(delta_t A) into a scratch buffer, then runs the adjoint recurrence
// h_t = g_t C_t + a_{t+1} h_{t+1} backwards in time. dB_t and dC_t (sums over channels) are
// accumulated over the item's blocks lane-wise and reduced across lanes once per step; each range
// writes its own partial sums, which the caller adds (so results do not depend on thread timing).
#include "simd.h"

#include <algorithm>
#include <memory>

namespace bm {

namespace {

constexpr int kChunk = 16;     // the forward saves the state every kChunk steps for the backward
constexpr int kMaxState = 64;  // the generic path keeps up to this many states per channel
constexpr int kRange = 16;     // blocks per work item
constexpr int kGroup = 4;      // blocks processed together in the backward's adjoint step

// A (b, l, last) sequence with unit stride along the last dimension.
template <typename T> struct Seq {
  const T* p = nullptr;
  int64_t sb = 0, sl = 0;
  const T* at(int64_t b, int64_t t) const { return p + b * sb + t * sl; }
};

template <typename S, typename TX, typename TD> struct Args {
  int64_t b, l, d, n, nblk;
  Seq<TX> x, z;
  Seq<TD> delta;
  Seq<S> B, C;
  const S* A;      // (d, n)
  const S* D;      // (d,) or null
  const S* init;   // (b, d, n) or null
  S* ckpt;         // (b, nchunk, nblk, n, lanes) or null
};

template <typename S> struct Block {
  int64_t d0;
  int cnt;
};

template <typename S> inline Block<S> block_of(int64_t blk, int64_t d) {
  const int64_t d0 = blk * lanes<S>;
  return {d0, static_cast<int>(std::min<int64_t>(lanes<S>, d - d0))};
}

// At[k] = A[d0 + lane, k] for the block's lanes (zeros beyond cnt).
template <typename S> inline void load_transposed(Vec<S>* out, const S* src, int64_t d0, int cnt, int n) {
  for (int k = 0; k < n; ++k) {
    out[k] = Vec<S>{};
    for (int i = 0; i < cnt; ++i) out[k][i] = src[(d0 + i) * n + k];
  }
}

template <typename S> inline void store_transposed(S* dst, const Vec<S>* v, int64_t d0, int cnt, int n) {
  for (int k = 0; k < n; ++k)
    for (int i = 0; i < cnt; ++i) dst[(d0 + i) * n + k] = v[k][i];
}

// Blocks [lo, hi) of range r when nblk blocks are split into `ranges` ranges.
struct Range {
  int64_t lo, hi;
};

inline Range range_of(int64_t r, int64_t nblk, int64_t ranges) {
  const int64_t per = (nblk + ranges - 1) / ranges;
  return {std::min(nblk, r * per), std::min(nblk, (r + 1) * per)};
}

template <typename S> using VecBuf = std::unique_ptr<Vec<S>[]>;
template <typename S> VecBuf<S> vec_buffer(int64_t count) { return VecBuf<S>(new Vec<S>[count]()); }

// At[j * n + k] = A[d0 + lane, k] * log2(e) for the range's blocks (so exp(delta A) = 2^(delta At)).
template <typename S> void load_scaled_A(Vec<S>* At, const S* A, Range rg, int64_t d, int n) {
  for (int64_t blk = rg.lo; blk < rg.hi; ++blk) {
    const auto [d0, cnt] = block_of<S>(blk, d);
    Vec<S>* out = At + (blk - rg.lo) * n;
    load_transposed<S>(out, A, d0, cnt, n);
    for (int k = 0; k < n; ++k) out[k] *= kLog2e<S>;
  }
}

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

// ------------------------------------------------------------------------------------------ backward
template <typename S, typename TX, typename TD> struct Grads {
  const TX* dy;     // (b, l, d) contiguous
  const S* dfinal;  // (b, d, n) or null
  TX* dx;           // (b, l, d)
  TD* ddelta;       // (b, l, d)
  TX* dz;           // (b, l, d) or null
  S* dA;            // (b, d, n) per-batch-row partial sums
  S* dD;            // (b, d) per-batch-row partial sums, or null
  S* dB;            // (ranges, b, l, n) per-range partial sums
  S* dC;            // (ranges, b, l, n)
  S* dinit;         // (b, d, n)
  int64_t ranges;
};

template <typename S> inline S hsum(Vec<S> v) {
  S s = 0;
  for (int i = 0; i < lanes<S>; ++i) s += v[i];
  return s;
}

// One time step of the adjoint for blocks j0 .. j0+G-1 of a range (G blocks share the broadcasts of
// B_t, C_t and the loads/stores of the dB / dC lane accumulators).
template <typename S, typename TX, typename TD> struct AdjointStep {
  int64_t off;  // offset of row (b, t) in the (b, l, d) gradients
  const TD* delta;
  const TX *x, *z;
  const S *B, *C;
  const Vec<S>*s, *sprev, *a, *At, *Dv;  // per (block, state): s_t, s_{t-1}, a_t, A log2(e); D per block
  Vec<S>*h, *dA, *dD;
};

template <typename S, typename TX, typename TD, int NS, int G>
inline void adjoint_blocks(const Args<S, TX, TD>& a, const Grads<S, TX, TD>& g, const AdjointStep<S, TX, TD>& st,
                           int64_t lo, int64_t j0, Vec<S>* bacc, Vec<S>* cacc) {
  using V = Vec<S>;
  constexpr int NM = NS ? NS : kMaxState;
  const int n = NS ? NS : static_cast<int>(a.n);
  int64_t d0[G];
  int cnt[G];
  V dl[G], xv[G], dx[G], gy[G], hb[G], ddl[G];
#pragma GCC unroll 4
  for (int i = 0; i < G; ++i) {
    const auto blk = block_of<S>(lo + j0 + i, a.d);
    d0[i] = blk.d0;
    cnt[i] = blk.cnt;
    dl[i] = vload_as<S>(st.delta + d0[i], cnt[i]);
    xv[i] = vload_as<S>(st.x + d0[i], cnt[i]);
    dx[i] = dl[i] * xv[i];
    gy[i] = vload_as<S>(g.dy + st.off + d0[i], cnt[i]);
    if (st.z) {
      const V* sj = st.s + (j0 + i) * n;
      const V zv = vload_as<S>(st.z + d0[i], cnt[i]);
      const V sig = vsigmoid(zv);
      V pre = st.Dv[j0 + i] * xv[i];
      for (int k = 0; k < n; ++k) pre += sj[k] * st.C[k];
      vstore_as<S>(g.dz + st.off + d0[i], gy[i] * pre * sig * (1 + zv * (1 - sig)), cnt[i]);
      gy[i] = gy[i] * zv * sig;
    }
    st.dD[j0 + i] += gy[i] * xv[i];
    hb[i] = ddl[i] = V{};
  }
  const V* s = st.s + j0 * n;
  const V* sp = st.sprev + j0 * n;
  const V* av = st.a + j0 * n;
  const V* At = st.At + j0 * n;
  V* h = st.h + j0 * n;
  V* dA = st.dA + j0 * n;
#pragma GCC unroll 16
  for (int k = 0; k < NM; ++k) {
    if (k >= n) break;
    const S Ck = st.C[k], Bk = st.B[k];
    V ca = cacc[k], ba = bacc[k];
#pragma GCC unroll 4
    for (int i = 0; i < G; ++i) {
      const int64_t e = i * n + k;
      const V hk = h[e] + gy[i] * Ck;
      ca += gy[i] * s[e];
      ba += hk * dx[i];
      hb[i] += hk * Bk;
      const V hn = hk * av[e];
      h[e] = hn;
      const V q = hn * sp[e];
      dA[e] += q * dl[i];
      ddl[i] += q * At[e];
    }
    cacc[k] = ca;
    bacc[k] = ba;
  }
#pragma GCC unroll 4
  for (int i = 0; i < G; ++i) {
    vstore_as<S>(g.dx + st.off + d0[i], gy[i] * st.Dv[j0 + i] + dl[i] * hb[i], cnt[i]);
    vstore_as<S>(g.ddelta + st.off + d0[i], ddl[i] * kLn2<S> + xv[i] * hb[i], cnt[i]);
  }
}

template <typename S, typename TX, typename TD, int NS>
void backward_range(const Args<S, TX, TD>& a, const Grads<S, TX, TD>& g, int64_t bi, int64_t r) {
  using V = Vec<S>;
  constexpr int NM = NS ? NS : kMaxState;
  const int n = NS ? NS : static_cast<int>(a.n);
  const Range rg = range_of(r, a.nblk, g.ranges);
  const int64_t nb = rg.hi - rg.lo;
  S* dB = g.dB + (r * a.b + bi) * a.l * n;
  S* dC = g.dC + (r * a.b + bi) * a.l * n;
  if (nb <= 0) {  // more ranges than blocks: this one adds nothing
    std::fill(dB, dB + a.l * n, S(0));
    std::fill(dC, dC + a.l * n, S(0));
    return;
  }
  const int64_t nchunk = (a.l + kChunk - 1) / kChunk;
  const int64_t per_step = nb * n;  // vectors per time step in the scratch buffers
  VecBuf<S> At = vec_buffer<S>(per_step), h = vec_buffer<S>(per_step), dA = vec_buffer<S>(per_step);
  VecBuf<S> Dv = vec_buffer<S>(nb), dD = vec_buffer<S>(nb);
  VecBuf<S> sbuf = vec_buffer<S>((kChunk + 1) * per_step), abuf = vec_buffer<S>(kChunk * per_step);
  load_scaled_A<S>(At.get(), a.A, rg, a.d, n);
  for (int64_t blk = rg.lo; blk < rg.hi; ++blk) {
    const auto [d0, cnt] = block_of<S>(blk, a.d);
    if (g.dfinal) load_transposed<S>(h.get() + (blk - rg.lo) * n, g.dfinal + bi * a.d * n, d0, cnt, n);
    if (a.D) Dv[blk - rg.lo] = vload<S>(a.D + d0, cnt);
  }
  for (int64_t c = nchunk - 1; c >= 0; --c) {
    const int64_t t0 = c * kChunk, t1 = std::min<int64_t>(a.l, t0 + kChunk);
    // 1. recompute s_t (sbuf step t - t0 + 1) and a_t (abuf step t - t0) from the checkpoint
    const V* ck = reinterpret_cast<const V*>(a.ckpt) + ((bi * nchunk + c) * a.nblk + rg.lo) * n;
    std::copy(ck, ck + per_step, sbuf.get());
    for (int64_t t = t0; t < t1; ++t) {
      const TD* drow = a.delta.at(bi, t);
      const TX* xrow = a.x.at(bi, t);
      const S* Bt = a.B.at(bi, t);
      const V* sprev = sbuf.get() + (t - t0) * per_step;
      V* snew = sbuf.get() + (t - t0 + 1) * per_step;
      V* ab = abuf.get() + (t - t0) * per_step;
      for (int64_t j = 0; j < nb; ++j) {
        const auto [d0, cnt] = block_of<S>(rg.lo + j, a.d);
        const V dl = vload_as<S>(drow + d0, cnt);
        const V dx = dl * vload_as<S>(xrow + d0, cnt);
        const V* Aj = At.get() + j * n;
#pragma GCC unroll 16
        for (int k = 0; k < NM; ++k) {
          if (k >= n) break;
          const V da = vexp2(dl * Aj[k]);
          ab[j * n + k] = da;
          snew[j * n + k] = da * sprev[j * n + k] + dx * Bt[k];
        }
      }
    }
    // 2. adjoint, backwards in time; h holds a_{t+1} h_{t+1} on entry to step t
    for (int64_t t = t1 - 1; t >= t0; --t) {
      AdjointStep<S, TX, TD> st;
      st.off = (bi * a.l + t) * a.d;
      st.delta = a.delta.at(bi, t);
      st.x = a.x.at(bi, t);
      st.z = a.z.p ? a.z.at(bi, t) : nullptr;
      st.B = a.B.at(bi, t);
      st.C = a.C.at(bi, t);
      st.s = sbuf.get() + (t - t0 + 1) * per_step;
      st.sprev = st.s - per_step;
      st.a = abuf.get() + (t - t0) * per_step;
      st.At = At.get();
      st.h = h.get();
      st.dA = dA.get();
      st.Dv = Dv.get();
      st.dD = dD.get();
      V bacc[NM], cacc[NM];
      for (int k = 0; k < n; ++k) bacc[k] = cacc[k] = V{};
      int64_t j = 0;
      for (; j + kGroup <= nb; j += kGroup) adjoint_blocks<S, TX, TD, NS, kGroup>(a, g, st, rg.lo, j, bacc, cacc);
      for (; j < nb; ++j) adjoint_blocks<S, TX, TD, NS, 1>(a, g, st, rg.lo, j, bacc, cacc);
      for (int k = 0; k < n; ++k) {
        dB[t * n + k] = hsum<S>(bacc[k]);
        dC[t * n + k] = hsum<S>(cacc[k]);
      }
    }
  }
  for (int64_t blk = rg.lo; blk < rg.hi; ++blk) {
    const auto [d0, cnt] = block_of<S>(blk, a.d);
    const int64_t j = blk - rg.lo;
    store_transposed<S>(g.dinit + bi * a.d * n, h.get() + j * n, d0, cnt, n);
    store_transposed<S>(g.dA + bi * a.d * n, dA.get() + j * n, d0, cnt, n);
    if (g.dD)
      for (int i = 0; i < cnt; ++i) g.dD[bi * a.d + d0 + i] = dD[j][i];
  }
}

// ------------------------------------------------------------------------------------------ entry points
// dtype codes: 0 float32, 1 bfloat16, 2 float64. Compute type S: float64 iff x is float64.
struct Tensors {
  const void *x, *delta, *z, *B, *C, *A, *D, *init;
  int64_t x_sb, x_sl, delta_sb, delta_sl, z_sb, z_sl, B_sb, B_sl, C_sb, C_sl;
  int64_t b, l, d, n;
  int dtype_x, dtype_delta;
};

template <typename S, typename TX, typename TD> Args<S, TX, TD> make_args(const Tensors& t, void* ckpt) {
  Args<S, TX, TD> a;
  a.b = t.b;
  a.l = t.l;
  a.d = t.d;
  a.n = t.n;
  a.nblk = (t.d + lanes<S> - 1) / lanes<S>;
  a.x = {static_cast<const TX*>(t.x), t.x_sb, t.x_sl};
  a.z = {static_cast<const TX*>(t.z), t.z_sb, t.z_sl};
  a.delta = {static_cast<const TD*>(t.delta), t.delta_sb, t.delta_sl};
  a.B = {static_cast<const S*>(t.B), t.B_sb, t.B_sl};
  a.C = {static_cast<const S*>(t.C), t.C_sb, t.C_sl};
  a.A = static_cast<const S*>(t.A);
  a.D = static_cast<const S*>(t.D);
  a.init = static_cast<const S*>(t.init);
  a.ckpt = static_cast<S*>(ckpt);
  return a;
}

// Calls fn.template operator()<S, TX, TD>() for the supported dtype combinations; false if unsupported.
template <typename F> bool dispatch_types(const Tensors& t, F&& fn) {
  const int X = t.dtype_x, T = t.dtype_delta;
  if (X == 2 && T == 2) return fn.template operator()<double, double, double>(), true;
  if (X == 0 && T == 0) return fn.template operator()<float, float, float>(), true;
  if (X == 1 && T == 0) return fn.template operator()<float, bf16, float>(), true;
  if (X == 1 && T == 1) return fn.template operator()<float, bf16, bf16>(), true;
  if (X == 0 && T == 1) return fn.template operator()<float, float, bf16>(), true;
  return false;
}

}  // namespace
}  // namespace bm

extern "C" {

int bm_vector_bytes() { return bm::kVecBytes; }
int bm_scan_chunk() { return bm::kChunk; }
int bm_scan_max_state() { return bm::kMaxState; }

// How many ranges of channel blocks to split d channels into: ranges of at most kRange blocks, and
// enough work items (batch rows x ranges) to occupy `threads` threads.
int64_t bm_scan_ranges(int64_t b, int64_t d, int elem_bytes, int threads) {
  const int64_t nblk = (d + bm::kVecBytes / elem_bytes - 1) / (bm::kVecBytes / elem_bytes);
  const int64_t by_size = (nblk + bm::kRange - 1) / bm::kRange;
  const int64_t by_threads = (threads + b - 1) / std::max<int64_t>(b, 1);
  return std::max<int64_t>(1, std::min(nblk, std::max(by_size, by_threads)));
}

// y (b, l, d) contiguous of x's dtype; final_state (b, d, n); ckpt (b, nchunk, nblk, n, lanes) or null.
// Work items: batch rows x `ranges` ranges of channel blocks (see bm_scan_ranges).
int bm_scan_forward(const bm::Tensors* t, void* y, void* final_state, void* ckpt, int64_t ranges, int threads) {
  using namespace bm;
  if (t->n > kMaxState || ranges < 1) return 1;
  const bool ok = dispatch_types(*t, [&]<typename S, typename TX, typename TD>() {
    const auto a = make_args<S, TX, TD>(*t, ckpt);
    TX* yp = static_cast<TX*>(y);
    S* fp = static_cast<S*>(final_state);
    parallel_for(a.b * ranges, threads, [&](int64_t i) {
      const Range rg = range_of(i % ranges, a.nblk, ranges);
      if (a.n == 16)
        forward_range<S, TX, TD, 16>(a, yp, fp, i / ranges, rg);
      else
        forward_range<S, TX, TD, 0>(a, yp, fp, i / ranges, rg);
    });
  });
  return ok ? 0 : 2;
}

// dy, dx, dz (b, l, d) contiguous of x's dtype, ddelta of delta's dtype; dfinal (b, d, n) or null;
// per-batch-row partial sums dA (b, d, n), dD (b, d) or null; per-range dB, dC (ranges, b, l, n);
// dinit (b, d, n).
int bm_scan_backward(const bm::Tensors* t, const void* ckpt, const void* dy, const void* dfinal, void* dx,
                     void* ddelta, void* dz, void* dA, void* dD, void* dB, void* dC, void* dinit, int64_t ranges,
                     int threads) {
  using namespace bm;
  if (t->n > kMaxState || ranges < 1) return 1;
  const bool ok = dispatch_types(*t, [&]<typename S, typename TX, typename TD>() {
    const auto a = make_args<S, TX, TD>(*t, const_cast<void*>(ckpt));
    Grads<S, TX, TD> g;
    g.dy = static_cast<const TX*>(dy);
    g.dfinal = static_cast<const S*>(dfinal);
    g.dx = static_cast<TX*>(dx);
    g.ddelta = static_cast<TD*>(ddelta);
    g.dz = static_cast<TX*>(dz);
    g.dA = static_cast<S*>(dA);
    g.dD = static_cast<S*>(dD);
    g.dB = static_cast<S*>(dB);
    g.dC = static_cast<S*>(dC);
    g.dinit = static_cast<S*>(dinit);
    g.ranges = ranges;
    parallel_for(a.b * ranges, threads, [&](int64_t i) {
      if (a.n == 16)
        backward_range<S, TX, TD, 16>(a, g, i / ranges, i % ranges);
      else
        backward_range<S, TX, TD, 0>(a, g, i / ranges, i % ranges);
    });
  });
  return ok ? 0 : 2;
}

}  // extern "C"
