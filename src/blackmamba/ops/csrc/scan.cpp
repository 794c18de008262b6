// Fused selective scan on CPU: forward (initial state in, final state out) and backward.
//
// Shapes (see ops/scan.py): x, delta, z (b, l, d) with unit stride along d; B, C (b, l, n);
// A (d, n); D (d,); states (b, d, n). The state is kept in registers as n vectors of `lanes`
// channels (one "block" of channels), so the recurrence runs along t with no memory traffic for
// the state; work is split over (batch, channel block) pairs.
//
// Backward: the forward saves the state at the start of every chunk of kChunk steps (1/kChunk of
// the full state history). The backward walks the chunks in reverse; for each block it recomputes
// the chunk's states and decay factors into a small scratch buffer, then runs the adjoint
// recurrence  h_t = g_t C_t + a_{t+1} h_{t+1}  backwards. dB and dC (sums over channels) are
// accumulated per lane over all blocks of a channel partition and reduced across lanes once per
// chunk; partitions write separate partial sums that the caller adds.
#include "simd.h"

#include <algorithm>
#include <memory>

namespace bm {

namespace {

constexpr int kChunk = 32;     // the forward saves the state every kChunk steps for the backward
constexpr int kMaxState = 64;  // the generic path keeps up to this many states per channel

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

// ------------------------------------------------------------------------------------------ forward
template <typename S, typename TX, typename TD, int NS>
void forward_block(const Args<S, TX, TD>& a, TX* y, S* final_state, int64_t bi, int64_t blk) {
  using V = Vec<S>;
  constexpr int NM = NS ? NS : kMaxState;
  const int n = NS ? NS : static_cast<int>(a.n);
  const auto [d0, cnt] = block_of<S>(blk, a.d);
  V At[NM], s[NM];  // At: A log2(e), so that exp(delta A) = 2^(delta At)
  load_transposed<S>(At, a.A, d0, cnt, n);
  for (int k = 0; k < n; ++k) At[k] *= kLog2e<S>;
  if (a.init) {
    load_transposed<S>(s, a.init + bi * a.d * n, d0, cnt, n);
  } else {
    for (int k = 0; k < n; ++k) s[k] = V{};
  }
  const V Dv = a.D ? vload<S>(a.D + d0, cnt) : V{};
  const int64_t nchunk = (a.l + kChunk - 1) / kChunk;
  for (int64_t t = 0; t < a.l; ++t) {
    if (a.ckpt && t % kChunk == 0) {
      V* ck = reinterpret_cast<V*>(a.ckpt) + ((bi * nchunk + t / kChunk) * a.nblk + blk) * n;
      for (int k = 0; k < n; ++k) ck[k] = s[k];
    }
    const V dl = vload_as<S>(a.delta.at(bi, t) + d0, cnt);
    const V xv = vload_as<S>(a.x.at(bi, t) + d0, cnt);
    const V dx = dl * xv;
    const S* Bt = a.B.at(bi, t);
    const S* Ct = a.C.at(bi, t);
    V acc = Dv * xv;
#pragma GCC unroll 16
    for (int k = 0; k < NM; ++k) {
      if (k >= n) break;
      const V da = vexp2(dl * At[k]);
      s[k] = da * s[k] + dx * Bt[k];
      acc += s[k] * Ct[k];
    }
    if (a.z.p) {
      const V zv = vload_as<S>(a.z.at(bi, t) + d0, cnt);
      acc *= zv * vsigmoid(zv);
    }
    vstore_as<S>(y + (bi * a.l + t) * a.d + d0, acc, cnt);
  }
  store_transposed<S>(final_state + bi * a.d * n, s, d0, cnt, n);
}

// ------------------------------------------------------------------------------------------ backward
template <typename S, typename TX, typename TD> struct Grads {
  const TX* dy;   // (b, l, d) contiguous
  const S* dfinal;  // (b, d, n) or null
  TX* dx;         // (b, l, d)
  TD* ddelta;     // (b, l, d)
  TX* dz;         // (b, l, d) or null
  S* dA;          // (b, d, n) per-batch partial sums
  S* dD;          // (b, d) per-batch partial sums, or null
  S* dB;          // (P, b, l, n) per-partition partial sums
  S* dC;          // (P, b, l, n)
  S* dinit;       // (b, d, n)
  int64_t parts;
};

// Per-work-item scratch (one item = one batch row x one channel partition).
template <typename S> struct Scratch {
  int nm;
  std::unique_ptr<Vec<S>[]> sbuf, abuf, bacc, cacc;  // (kChunk+1|kChunk, nm) each
  std::unique_ptr<Vec<S>[]> h, dA, At;                 // (blocks, nm)
  std::unique_ptr<Vec<S>[]> dD;                         // (blocks,)
  Scratch(int nm_, int64_t blocks) : nm(nm_) {
    sbuf.reset(new Vec<S>[(kChunk + 1) * nm]);
    abuf.reset(new Vec<S>[kChunk * nm]);
    bacc.reset(new Vec<S>[kChunk * nm]());
    cacc.reset(new Vec<S>[kChunk * nm]());
    h.reset(new Vec<S>[blocks * nm]());
    dA.reset(new Vec<S>[blocks * nm]());
    At.reset(new Vec<S>[blocks * nm]());
    dD.reset(new Vec<S>[blocks]());
  }
};

// One block of channels over one chunk [t0, t1): recompute, then the adjoint recurrence.
template <typename S, typename TX, typename TD, int NS>
void backward_chunk(const Args<S, TX, TD>& a, const Grads<S, TX, TD>& g, Scratch<S>& w, int64_t bi,
                    int64_t blk, int64_t jb, int64_t c) {
  using V = Vec<S>;
  constexpr int NM = NS ? NS : kMaxState;
  const int n = NS ? NS : static_cast<int>(a.n);
  const int nm = w.nm;
  const auto [d0, cnt] = block_of<S>(blk, a.d);
  const int64_t nchunk = (a.l + kChunk - 1) / kChunk;
  const int64_t t0 = c * kChunk, t1 = std::min<int64_t>(a.l, t0 + kChunk);
  const V* At = w.At.get() + jb * nm;  // A log2(e)

  // 1. recompute s_t (sbuf[j + 1]) and a_t = exp(delta_t A) (abuf[j]) for t = t0 + j
  V s[NM];
  const V* ck = reinterpret_cast<const V*>(a.ckpt) + ((bi * nchunk + c) * a.nblk + blk) * n;
  for (int k = 0; k < n; ++k) s[k] = w.sbuf[k] = ck[k];
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t j = t - t0;
    const V dl = vload_as<S>(a.delta.at(bi, t) + d0, cnt);
    const V dx = dl * vload_as<S>(a.x.at(bi, t) + d0, cnt);
    const S* Bt = a.B.at(bi, t);
    V* sb = w.sbuf.get() + (j + 1) * nm;
    V* ab = w.abuf.get() + j * nm;
#pragma GCC unroll 16
    for (int k = 0; k < NM; ++k) {
      if (k >= n) break;
      const V da = vexp2(dl * At[k]);
      s[k] = da * s[k] + dx * Bt[k];
      ab[k] = da;
      sb[k] = s[k];
    }
  }

  // 2. adjoint: hr[k] holds a_{t+1} h_{t+1} on entry to step t
  V hr[NM], dAr[NM];
  V* hsave = w.h.get() + jb * nm;
  V* dAsave = w.dA.get() + jb * nm;
  for (int k = 0; k < n; ++k) {
    hr[k] = hsave[k];
    dAr[k] = dAsave[k];
  }
  const V Dv = a.D ? vload<S>(a.D + d0, cnt) : V{};
  V dDv = w.dD[jb];
  for (int64_t t = t1 - 1; t >= t0; --t) {
    const int64_t j = t - t0;
    const int64_t off = (bi * a.l + t) * a.d + d0;
    const V dl = vload_as<S>(a.delta.at(bi, t) + d0, cnt);
    const V xv = vload_as<S>(a.x.at(bi, t) + d0, cnt);
    const V dx = dl * xv;
    const S* Bt = a.B.at(bi, t);
    const S* Ct = a.C.at(bi, t);
    const V* sb = w.sbuf.get() + (j + 1) * nm;  // s_t; s_{t-1} is sb - nm
    const V* ab = w.abuf.get() + j * nm;
    V* bacc = w.bacc.get() + j * nm;
    V* cacc = w.cacc.get() + j * nm;
    V gy = vload_as<S>(g.dy + off, cnt);
    if (a.z.p) {
      const V zv = vload_as<S>(a.z.at(bi, t) + d0, cnt);
      const V sig = vsigmoid(zv);
      V pre = Dv * xv;
      for (int k = 0; k < n; ++k) pre += sb[k] * Ct[k];
      vstore_as<S>(g.dz + off, gy * pre * sig * (1 + zv * (1 - sig)), cnt);
      gy = gy * zv * sig;
    }
    dDv += gy * xv;
    V hb = V{}, ddl = V{};
#pragma GCC unroll 16
    for (int k = 0; k < NM; ++k) {
      if (k >= n) break;
      const V hk = hr[k] + gy * Ct[k];
      cacc[k] += gy * sb[k];
      bacc[k] += hk * dx;
      hb += hk * Bt[k];
      const V q = hk * ab[k] * sb[k - nm];
      dAr[k] += q * dl;
      ddl += q * At[k];
      hr[k] = hk * ab[k];
    }
    vstore_as<S>(g.dx + off, gy * Dv + dl * hb, cnt);
    vstore_as<S>(g.ddelta + off, ddl * kLn2<S> + xv * hb, cnt);
  }
  for (int k = 0; k < n; ++k) {
    hsave[k] = hr[k];
    dAsave[k] = dAr[k];
  }
  w.dD[jb] = dDv;
}

template <typename S, typename TX, typename TD, int NS>
void backward_item(const Args<S, TX, TD>& a, const Grads<S, TX, TD>& g, int64_t bi, int64_t p) {
  using V = Vec<S>;
  constexpr int W = lanes<S>;
  const int n = static_cast<int>(a.n);
  const int64_t per = (a.nblk + g.parts - 1) / g.parts;
  const int64_t blo = p * per, bhi = std::min(a.nblk, blo + per);
  const int64_t nchunk = (a.l + kChunk - 1) / kChunk;
  S* dB = g.dB + (p * a.b + bi) * a.l * n;
  S* dC = g.dC + (p * a.b + bi) * a.l * n;
  if (blo >= bhi) {  // more partitions than blocks: this one has nothing to add
    std::fill(dB, dB + a.l * n, S(0));
    std::fill(dC, dC + a.l * n, S(0));
    return;
  }
  Scratch<S> w(n, bhi - blo);
  for (int64_t blk = blo; blk < bhi; ++blk) {
    const auto [d0, cnt] = block_of<S>(blk, a.d);
    V* At = w.At.get() + (blk - blo) * n;  // A log2(e)
    load_transposed<S>(At, a.A, d0, cnt, n);
    for (int k = 0; k < n; ++k) At[k] *= kLog2e<S>;
    if (g.dfinal) load_transposed<S>(w.h.get() + (blk - blo) * n, g.dfinal + bi * a.d * n, d0, cnt, n);
  }
  for (int64_t c = nchunk - 1; c >= 0; --c) {
    const int64_t t0 = c * kChunk, t1 = std::min<int64_t>(a.l, t0 + kChunk);
    for (int64_t blk = blo; blk < bhi; ++blk) backward_chunk<S, TX, TD, NS>(a, g, w, bi, blk, blk - blo, c);
    for (int64_t t = t0; t < t1; ++t) {
      V* bacc = w.bacc.get() + (t - t0) * n;
      V* cacc = w.cacc.get() + (t - t0) * n;
      for (int k = 0; k < n; ++k) {
        S sb = 0, sc = 0;
        for (int i = 0; i < W; ++i) {
          sb += bacc[k][i];
          sc += cacc[k][i];
        }
        dB[t * n + k] = sb;
        dC[t * n + k] = sc;
        bacc[k] = V{};
        cacc[k] = V{};
      }
    }
  }
  for (int64_t blk = blo; blk < bhi; ++blk) {
    const auto [d0, cnt] = block_of<S>(blk, a.d);
    const int64_t jb = blk - blo;
    store_transposed<S>(g.dinit + bi * a.d * n, w.h.get() + jb * n, d0, cnt, n);
    store_transposed<S>(g.dA + bi * a.d * n, w.dA.get() + jb * n, d0, cnt, n);
    if (g.dD)
      for (int i = 0; i < cnt; ++i) g.dD[bi * a.d + d0 + i] = w.dD[jb][i];
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

// y (b, l, d) contiguous of x's dtype; final_state (b, d, n); ckpt (b, nchunk, nblk, n, lanes) or null.
int bm_scan_forward(const bm::Tensors* t, void* y, void* final_state, void* ckpt, int threads) {
  using namespace bm;
  if (t->n > kMaxState) return 1;
  const bool ok = dispatch_types(*t, [&]<typename S, typename TX, typename TD>() {
    const auto a = make_args<S, TX, TD>(*t, ckpt);
    TX* yp = static_cast<TX*>(y);
    S* fp = static_cast<S*>(final_state);
    parallel_for(a.b * a.nblk, threads, [&](int64_t i) {
      if (a.n == 16)
        forward_block<S, TX, TD, 16>(a, yp, fp, i / a.nblk, i % a.nblk);
      else
        forward_block<S, TX, TD, 0>(a, yp, fp, i / a.nblk, i % a.nblk);
    });
  });
  return ok ? 0 : 2;
}

// dy, dx, dz (b, l, d) contiguous of x's dtype, ddelta of delta's dtype; dfinal (b, d, n) or null;
// per-batch partial sums dA (b, d, n), dD (b, d) or null; per-partition dB, dC (parts, b, l, n);
// dinit (b, d, n). Work is split over batch rows x `parts` channel partitions.
int bm_scan_backward(const bm::Tensors* t, const void* ckpt, const void* dy, const void* dfinal, void* dx,
                     void* ddelta, void* dz, void* dA, void* dD, void* dB, void* dC, void* dinit, int64_t parts,
                     int threads) {
  using namespace bm;
  if (t->n > kMaxState || parts < 1) return 1;
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
    g.parts = parts;
    parallel_for(a.b * parts, threads, [&](int64_t i) {
      if (a.n == 16)
        backward_item<S, TX, TD, 16>(a, g, i / parts, i % parts);
      else
        backward_item<S, TX, TD, 0>(a, g, i / parts, i % parts);
    });
  });
  return ok ? 0 : 2;
}

}  // extern "C"
