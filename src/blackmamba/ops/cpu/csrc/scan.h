// Shared pieces of the fused CPU selective scan (scan_forward.cpp, scan_backward.cpp): shapes and
// strides, channel blocks and ranges, the dtype dispatch. See scan_forward.cpp for the design.
#pragma once

#include "simd.h"

#include <algorithm>
#include <memory>

namespace bm {
namespace scan {

constexpr int kChunk = 16;     // the forward saves the state every kChunk steps for the backward
constexpr int kMaxState = 64;  // the generic path keeps up to this many states per channel
constexpr int kRange = 16;     // blocks per work item in the backward
constexpr int kForwardRange = 64;  // blocks per work item in the forward (see scan_forward.cpp)
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

// Calls fn.template operator()<S, TX, TD, NS>() for the supported dtype combinations (x / delta:
// float32 / float32, bfloat16 / float32, bfloat16 / bfloat16, float64 / float64) and state sizes
// (NS = 16 compiled for Mamba's size, NS = 0 for any other); false if unsupported.
template <typename F> bool dispatch_types(const Tensors& t, F&& fn) {
  const int X = t.dtype_x, T = t.dtype_delta;
  const bool n16 = t.n == 16;
  if (X == 2 && T == 2) return fn.template operator()<double, double, double, 0>(), true;
  if (X == 0 && T == 0) return n16 ? fn.template operator()<float, float, float, 16>()
                                   : fn.template operator()<float, float, float, 0>(), true;
  if (X == 1 && T == 0) return n16 ? fn.template operator()<float, bf16, float, 16>()
                                   : fn.template operator()<float, bf16, float, 0>(), true;
  if (X == 1 && T == 1) return n16 ? fn.template operator()<float, bf16, bf16, 16>()
                                   : fn.template operator()<float, bf16, bf16, 0>(), true;
  return false;
}

}  // namespace scan
}  // namespace bm
