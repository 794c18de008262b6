// Backward of the fused CPU selective scan; the design is described in scan_forward.cpp.
#include "scan.h"

namespace bm {
namespace scan {

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

}  // namespace scan
}  // namespace bm

extern "C" {

// dy, dx, dz (b, l, d) contiguous of x's dtype, ddelta of delta's dtype; dfinal (b, d, n) or null;
// per-batch-row partial sums dA (b, d, n), dD (b, d) or null; per-range dB, dC (ranges, b, l, n);
// dinit (b, d, n).
int bm_scan_backward(const bm::scan::Tensors* t, const void* ckpt, const void* dy, const void* dfinal, void* dx,
                     void* ddelta, void* dz, void* dA, void* dD, void* dB, void* dC, void* dinit, int64_t ranges,
                     int threads) {
  using namespace bm;
  using namespace bm::scan;
  if (t->n > kMaxState || ranges < 1) return 1;
  const bool ok = dispatch_types(*t, [&]<typename S, typename TX, typename TD, int NS>() {
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
    parallel_for(a.b * ranges, threads,
                 [&](int64_t i) { backward_range<S, TX, TD, NS>(a, g, i / ranges, i % ranges); });
  });
  return ok ? 0 : 2;
}

}  // extern "C"