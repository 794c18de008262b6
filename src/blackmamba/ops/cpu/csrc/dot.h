// Matrix-vector products for decode: y[q, row] = sum_k w[row, k] x[q, k] for a few rows q of x.
// Several weight rows at a time: independent accumulator chains keep enough loads in flight to
// stream the weights at memory speed, helped by a software prefetch of the next rows.
// w: float32 or bfloat16; x, y: float32.
#pragma once

#include "simd.h"

#include <algorithm>

// Each product is rounded before it is added (no fused multiply-add here): with -ffp-contract=fast the compiler
// fused some instantiations of the loops below and not others, so a row's sum depended on how many rows were
// computed with it. Unfused, every row is summed the same way whatever the batch (batch invariance; the loops are
// limited by reading the weights, not by the arithmetic).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif

namespace bm {

constexpr int kDotMaxRows = 8;  // rows of x (sequences in the batch)
// The loop below reads G rows side by side and prefetches the next G rows at the same offset: rows
// are 1.5-4 KiB, too short for the hardware prefetcher to ramp up on, and a fixed-distance prefetch
// runs past a row's end into memory the next group does not read (docs/benchmarks.md).

inline float hsum(vfloat v) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  float s = 0;
  for (int lane = 0; lane < lanes<float>; ++lane) s += v[lane];
  return s;
}

// rows [r0, r1) of w (o x len); x row q at x + q * xstride; y[q * ystride + row]. NX is a template
// parameter so that the accumulators live in registers.
template <int NX, typename TW>
inline void dot_rows_n(const TW* w, const float* x, int64_t xstride, int64_t len, int64_t r0, int64_t r1, float* y,
                       int64_t ystride) {
#if defined(__clang__)
#pragma clang fp contract(off)  // (clang's form of the GCC pragma above, which clang ignores)
#endif
  constexpr int W = lanes<float>;
  constexpr int G = NX <= 2 ? 4 : 2;  // weight rows at a time
  int64_t row = r0;
  for (; row + G <= r1; row += G) {
    vfloat acc[NX][G] = {};
    auto step = [&](int64_t k, int cnt) {
      vfloat wv[G];
      for (int g = 0; g < G; ++g) {
        __builtin_prefetch(w + (row + G + g) * len + k);  // the next group's same spot (never faults)
        wv[g] = vload_as<float>(w + (row + g) * len + k, cnt);
      }
      for (int q = 0; q < NX; ++q) {
        const vfloat xv = vload<float>(x + q * xstride + k, cnt);
        for (int g = 0; g < G; ++g) acc[q][g] += wv[g] * xv;
      }
    };
    int64_t k = 0;
    for (; k + W <= len; k += W) step(k, W);  // full vectors: a tight loop
    if (k < len) step(k, static_cast<int>(len - k));
    for (int q = 0; q < NX; ++q)
      for (int g = 0; g < G; ++g) y[q * ystride + row + g] = hsum(acc[q][g]);
  }
  for (; row < r1; ++row) {
    vfloat acc[NX] = {};
    auto step = [&](int64_t k, int cnt) {
      const vfloat wv = vload_as<float>(w + row * len + k, cnt);
      for (int q = 0; q < NX; ++q) acc[q] += wv * vload<float>(x + q * xstride + k, cnt);
    };
    int64_t k = 0;
    for (; k + W <= len; k += W) step(k, W);
    if (k < len) step(k, static_cast<int>(len - k));
    for (int q = 0; q < NX; ++q) y[q * ystride + row] = hsum(acc[q]);
  }
}

template <typename TW>
inline void dot_rows(const TW* w, const float* x, int64_t xstride, int64_t len, int64_t nx, int64_t r0, int64_t r1,
                     float* y, int64_t ystride) {
  switch (nx) {
    case 1: return dot_rows_n<1>(w, x, xstride, len, r0, r1, y, ystride);
    case 2: return dot_rows_n<2>(w, x, xstride, len, r0, r1, y, ystride);
    case 3: return dot_rows_n<3>(w, x, xstride, len, r0, r1, y, ystride);
    case 4: return dot_rows_n<4>(w, x, xstride, len, r0, r1, y, ystride);
    case 5: return dot_rows_n<5>(w, x, xstride, len, r0, r1, y, ystride);
    case 6: return dot_rows_n<6>(w, x, xstride, len, r0, r1, y, ystride);
    case 7: return dot_rows_n<7>(w, x, xstride, len, r0, r1, y, ystride);
    default: return dot_rows_n<8>(w, x, xstride, len, r0, r1, y, ystride);
  }
}

}  // namespace bm

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif
