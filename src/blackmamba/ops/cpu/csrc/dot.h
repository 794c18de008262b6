// Matrix-vector products for decode: y[q, row] = sum_k w[row, k] x[q, k] for a few rows q of x.
// Several weight rows at a time: independent accumulator chains keep enough loads in flight to
// stream the weights at memory speed, helped by a software prefetch of the next rows.
// w: float32 or bfloat16, or int8 / int4 through the views at the end (Int8Rows, Int4Rows); x, y: float32.
#pragma once

#include "simd.h"

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

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

// out[i] = hsum(v[i]) for i < n <= lanes: the same sums in the same order, a block of vectors at once (their
// additions interleaved rather than each a chain of dependent ones)
inline void hsums(const vfloat* v, int n, float* out) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  constexpr int W = lanes<float>;
  float t[W][W], s[W] = {};
  for (int i = 0; i < W; ++i) vstore_as<float>(t[i], i < n ? v[i] : vfloat{}, W);
  for (int lane = 0; lane < W; ++lane)
    for (int i = 0; i < W; ++i) s[i] += t[i][lane];
  std::copy(s, s + n, out);
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

// ---- quantized weights (ops/quant.py's format), through views that dot_rows is overloaded on, so that a kernel
// templated on its weight type (a pointer or a view) can take either. The values become float32 in registers and
// are multiplied by x with fused multiply-adds where the CPU has them (explicit instructions, so every row gets
// the same ones; else products rounded before the add, as above); the scales are applied to the sums. A view's x
// is *prepared* once per matrix (prepare_x: xlen() floats a row of x, quantized as the product defines) and dot_rows
// reads the prepared rows. Every row is summed in the same order whatever the number of rows (nx) or the rows
// computed with it. Quantized rows are short (768 bytes for int8 at i = 768, 384 for int4), so the prefetch runs
// kQuantAheadRows rows ahead rather than one block of rows, into L2 (prefetcht1): on a 2-core Zen 4 VM 64 rows into
// L2 beat 16 or 32 rows into L1 (with or without a further L2 prefetch), 128 to 512 rows; on a 2-core Zen 3 VM 8
// and 16 rows into L2 beat 64 by 5-11 % and 1-6 % (int8 and int4, 50280 x 768 on 2 threads, 3072 x 768 on one),
// 256 lost 25 % (int8), none at all 50 %; 16 rows into L2 was not tried on Zen 4.

constexpr int kQuantAheadRows = 16;

// acc + a * b
inline vfloat madd(vfloat acc, vfloat a, vfloat b) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
#if defined(__AVX512F__)
  return (vfloat)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)acc);
#elif defined(__FMA__)
  return (vfloat)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)acc);
#else
  return acc + a * b;
#endif
}

// every lane a (splat adds a to a zero vector, an addition the compiler must keep: -0 + 0 is +0)
inline vfloat bcast(float a) {
#if defined(__AVX512F__)
  return (vfloat)_mm512_set1_ps(a);
#elif defined(__AVX__)
  return (vfloat)_mm256_set1_ps(a);
#else
  return splat<float>(a);
#endif
}

inline vfloat vround_even(vfloat v) {  // to the nearest integer, ties to even (the default rounding mode)
#if defined(__AVX512F__)
  return (vfloat)_mm512_roundscale_ps((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#elif defined(__AVX__)
  return (vfloat)_mm256_round_ps((__m256)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  for (int l = 0; l < lanes<float>; ++l) v[l] = std::nearbyint(v[l]);
  return v;
#endif
}

// The activations of a quantized product (ops/quant.py's quantize_activation): each group of `group` elements of
// a row of x as integers xq (int8: kLevels 127, int4 products; int16: 32767, int8 products) and one float32 scale
// d = max|x| / kLevels, xq = round-half-even(x / d) (0 where d is 0), so x ≈ xq · d; the same arithmetic as
// torch's, so kernel and reference quantize x identically.
template <typename TQ, int kLevels>
inline void quantize_groups(const float* x, int64_t len, int64_t group, TQ* xq, float* d) {
  constexpr int W = lanes<float>;
  for (int64_t g = 0, k0 = 0; k0 < len; ++g, k0 += group) {
    const int64_t n = std::min(len, k0 + group) - k0;
    const float* xg = x + k0;
    vfloat m = {};
    for (int64_t k = 0; k < n; k += W) {
      const vfloat v = vload<float>(xg + k, static_cast<int>(std::min<int64_t>(W, n - k)));  // (0 past n)
      const vfloat a = v < 0 ? -v : v;
      m = a > m || a != a ? a : m;  // a NaN stays: d is then NaN, and so is the product, as torch's
    }
    float amax = 0;
    for (int l = 0; l < W; ++l) amax = m[l] != m[l] || m[l] > amax ? m[l] : amax;
    constexpr float kMax = static_cast<float>(kLevels);
    const float s = amax / kMax, div = s > 0 ? s : 1.0f;
    for (int64_t k = 0; k < n; k += W) {
      const int cnt = static_cast<int>(std::min<int64_t>(W, n - k));
      vfloat r = vround_even(vload<float>(xg + k, cnt) / div);
      r = r > kMax ? splat<float>(kMax) : r;
      r = r < -kMax ? splat<float>(-kMax) : r;
      const vint qi = __builtin_convertvector(r, vint);
      for (int l = 0; l < cnt; ++l) xq[k0 + k + l] = static_cast<TQ>(qi[l]);
    }
    d[g] = s;
  }
}

// the integer ways of quantized products (below): AVX2's integer multiply-adds, FMA (int4: F16C's float16 scales)
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define BM_INT4_INT8_X 1
#else
#define BM_INT4_INT8_X 0
#endif
#if defined(__AVX2__) && defined(__FMA__)
#define BM_INT8_INT16_X 1
#else
#define BM_INT8_INT16_X 0
#endif

#if BM_INT8_INT16_X || BM_INT4_INT8_X
// v's lanes summed in lane order: one order for every row whatever the batch (batch invariance)
inline float sum_lanes(__m256 v) {
  alignas(32) float l[8];
  _mm256_store_ps(l, v);
  float s = 0;
  for (int j = 0; j < 8; ++j) s += l[j];
  return s;
}

// G rows' vectors summed by one tree, ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)), whatever G (batch
// invariance): four rows with three horizontal adds, one row by the same adds of the vector with itself
template <int G> inline void sum_lanes_tree(const __m256 (&v)[G], float* out) {
  if constexpr (G == 4) {
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
  } else {
    for (int g = 0; g < G; ++g) {
      const __m256 p = _mm256_hadd_ps(v[g], v[g]), h = _mm256_hadd_ps(p, p);
      out[g] = _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
    }
  }
}
#endif

// int8, one float32 scale a row, times x quantized to int16 per kInt8XGroup elements (quantize_groups):
//   y[q, row] = scale[row] * sum over the groups g of d[q, g] * sum_{k in g} q[row, k] xq[q, k].
// Two ways, one result (up to float32 rounding):
// - integer (int16_x(): AVX2 and FMA, len a multiple of 16): a step is 16 weight bytes, sign-extended to int16
//   (vpmovsxbw) and multiplied by x's int16 values with vpmaddwd (pairs summed into int32, exactly: at most
//   2 · 128 · 32767 a lane a step, so a group's 8 steps fit with room to spare), the group's int32 lanes then
//   converted to float and multiplied by d[g]. prepare_x stores a row's xq (len / 2 floats' bytes), then d.
// - float (any other case): x's dequantized values xq · d, len floats, times the weights widened to float32.
constexpr int64_t kInt8XGroup = 128;  // ops/quant.py INT8_X_GROUP

struct Int8Rows {
  static constexpr bool kPrepared = true;
  static constexpr int kIntStep = 16;  // elements a step (the integer way)
  const int8_t* q;                     // (o, len)
  const float* scales;                 // (o,)
  int64_t len;
  int64_t groups() const { return (len + kInt8XGroup - 1) / kInt8XGroup; }
  bool int16_x() const { return BM_INT8_INT16_X && len % kIntStep == 0; }
  int64_t xlen() const { return int16_x() ? len / 2 + groups() : len; }  // floats a prepared row
  void prepare_x(const float* x, int64_t xstride, int64_t nx, float* xp) const {
    const int64_t n = xlen(), ng = groups();
    std::vector<int16_t> xq(len);
    std::vector<float> d(ng);
    for (int64_t r = 0; r < nx; ++r) {
      quantize_groups<int16_t, 32767>(x + r * xstride, len, kInt8XGroup, xq.data(), d.data());
      float* out = xp + r * n;
      if (int16_x()) {
        std::memcpy(out, xq.data(), len * sizeof(int16_t));
        std::copy(d.begin(), d.end(), out + len / 2);
      } else {
        for (int64_t k = 0; k < len; ++k) out[k] = static_cast<float>(xq[k]) * d[k / kInt8XGroup];
      }
    }
  }
};

// int4, two values a byte (element k in byte k / 2, the low nibble for even k, stored as n = value + 8), one
// float16 scale per `group` (even) elements of a row, times x quantized per group (quantize_groups):
//   y[q, row] = sum over the groups g of scale[row, g] * d[q, g] * (sum_{k in g} n[row, k] xq[q, k] - 8 sum_{k in g} xq[q, k]).
// Two ways, one result (up to float32 rounding):
// - integer (int8_x(): AVX2, group 32 or 64, len a multiple of 64): a step is 32 weight bytes, 64 elements. The
//   nibbles are split into bytes (lo: the even elements, hi: the odd ones) and multiplied by x's int8 values with
//   vpmaddubsw (unsigned nibble times signed byte, pairs summed into int16: at most 2 · 15 · 127, no saturation),
//   the two halves added and summed by fours into int32 (vpmaddwd), exactly; lane j of a step holds elements
//   8j..8j+7, so a group of 32 is 4 lanes, of 64 all 8. Each lane is converted to float and multiplied by its
//   group's scale[row, g] · d[g]. prepare_x stores a step's 32 even then 32 odd xq bytes, then d and
//   c[g] = -8 d[g] sum_{k in g} xq[k] (each padded to whole vectors of groups).
// - float (any other case): x's dequantized values xq · d, each step 2 · lanes<float> elements, one byte
//   b = lo + 16 hi a 32-bit lane (lo an even element, hi the odd one after it); a step's lo · xe + hi · xo is taken
//   as lo · (xe - xo / 16) + b · (xo / 16): two conversions (lo, b) and no shift. So prepare_x stores x step by
//   step as xe - xo / 16 for the step's even elements, then xo / 16 for its odd ones, each group starting a step
//   and a partial step padded with zeros (a missing byte reads as 0). After the groups it stores
//   c[g] = -8 sum_{k in g} x[k], padded with zeros to whole vectors, which dot_block adds as scale · c a vector of
//   groups at a time.
// The float16 scales are converted a vector at a time.
struct Int4Rows {
  static constexpr bool kPrepared = true;
  static constexpr int kStep = 2 * lanes<float>;  // elements a step (the float way)
  static constexpr int kIntStep = 64;             // elements a step (the integer way)
  const uint8_t* q;                               // (o, row_bytes())
  const uint16_t* scales;                         // float16 bits, (o, groups())
  int64_t len, group;
  int64_t row_bytes() const { return (len + 1) / 2; }
  int64_t groups() const { return (len + group - 1) / group; }
  int64_t padded_groups() const { return (groups() + lanes<float> - 1) / lanes<float> * lanes<float>; }
  bool int8_x() const {
#if BM_INT4_INT8_X
    return (group == 32 || group == 64) && len % kIntStep == 0;
#else
    return false;
#endif
  }
  int64_t group_stride() const { return (group + kStep - 1) / kStep * kStep; }  // prepared floats a group
  int64_t corrections() const { return groups() * group_stride(); }            // where c starts in a prepared row
  int64_t xlen() const {  // floats a prepared row
    return int8_x() ? len / 4 + 2 * padded_groups() : corrections() + padded_groups();
  }
  void prepare_x(const float* x, int64_t xstride, int64_t nx, float* xp) const {
    constexpr int W = lanes<float>;
    const int64_t n = xlen(), gstride = group_stride(), ng = groups(), ngp = padded_groups();
    std::vector<int8_t> xq(len);
    std::vector<float> d(ng);
    for (int64_t r = 0; r < nx; ++r) {
      quantize_groups<int8_t, 127>(x + r * xstride, len, group, xq.data(), d.data());
      float* out = xp + r * n;
      std::fill(out, out + n, 0.0f);
      if (int8_x()) {
        int8_t* bytes = reinterpret_cast<int8_t*>(out);
        for (int64_t s = 0; s < len; s += kIntStep)
          for (int p = 0; p < kIntStep / 2; ++p) {
            bytes[s + p] = xq[s + 2 * p];
            bytes[s + kIntStep / 2 + p] = xq[s + 2 * p + 1];
          }
        float* dd = out + len / 4;
        for (int64_t g = 0; g < ng; ++g) {
          int32_t sum = 0;
          for (int64_t k = g * group; k < (g + 1) * group; ++k) sum += xq[k];
          dd[g] = d[g];
          dd[ngp + g] = d[g] * static_cast<float>(-8 * sum);
        }
        continue;
      }
      for (int64_t g = 0; g < ng; ++g) {
        const int64_t k0 = g * group, k1 = std::min(len, k0 + group);
        float* og = out + g * gstride;
        float sum = 0;
        for (int64_t k = k0; k < k1; ++k) {
          const int64_t s = k - k0, j = s % kStep;
          const float v = static_cast<float>(xq[k]) * d[g];
          og[s / kStep * kStep + (j % 2) * W + j / 2] = v;
          sum += v;
        }
        for (int64_t t = 0; t < gstride; t += kStep)
          for (int l = 0; l < W; ++l) {
            og[t + W + l] *= 0.0625f;    // xo / 16 (exact)
            og[t + l] -= og[t + W + l];  // xe - xo / 16
          }
        out[corrections() + g] = -8 * sum;
      }
    }
  }
};

// The float32 scales of rows [0, G) of sr (ng a row), groups [g0, g0 + cnt), cnt <= lanes<float>: out[g][j] for
// group g0 + j, 0 past cnt.
template <int G>
inline void int4_scales(const uint16_t* sr, int64_t ng, int64_t g0, int cnt, float (*out)[lanes<float>]) {
  for (int g = 0; g < G; ++g) {
#if defined(__AVX512F__)
    if (cnt == lanes<float>) {
      _mm512_storeu_ps(out[g], _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sr + g * ng + g0))));
      continue;
    }
#elif defined(__F16C__)
    if (cnt == lanes<float>) {
      _mm256_storeu_ps(out[g], _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sr + g * ng + g0))));
      continue;
    }
#endif
    for (int j = 0; j < lanes<float>; ++j) out[g][j] = j < cnt ? half_to_float(sr[g * ng + g0 + j]) : 0.0f;
  }
}

#if BM_INT8_INT16_X
// the integer way of rows [row, row + G) of an int8 view (see Int8Rows); prepared x row q at xp + q * xs
template <int NX, int G>
inline void dot_block_int16_x(const Int8Rows& w, const float* xp, int64_t xs, int64_t row, float* y,
                              int64_t ystride) {
  if constexpr (NX > 4) {  // x rows four at a time (registers), the weight rows read again from L1
    dot_block_int16_x<4, G>(w, xp, xs, row, y, ystride);
    return dot_block_int16_x<NX - 4, G>(w, xp + 4 * xs, xs, row, y + 4 * ystride, ystride);
  }
  constexpr int S = Int8Rows::kIntStep;
  const int64_t len = w.len, ng = w.groups();
  const int8_t* wr = w.q + row * len;
  __m256 acc[NX][G];
  for (int q = 0; q < NX; ++q)
    for (int g = 0; g < G; ++g) acc[q][g] = _mm256_setzero_ps();
  for (int64_t gi = 0; gi < ng; ++gi) {
    const int64_t k0 = gi * kInt8XGroup, k1 = std::min(len, k0 + kInt8XGroup);
    __m256i sum[NX][G];
    for (int q = 0; q < NX; ++q)
      for (int g = 0; g < G; ++g) sum[q][g] = _mm256_setzero_si256();
    for (int64_t k = k0; k < k1; k += S) {
      if (k % 64 == 0)
        for (int g = 0; g < G; ++g) __builtin_prefetch(wr + (kQuantAheadRows + g) * len + k, 0, 2);  // never faults
      __m256i xv[NX];
      for (int q = 0; q < NX; ++q)
        xv[q] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(reinterpret_cast<const int16_t*>(xp + q * xs) + k));
      for (int g = 0; g < G; ++g) {
        const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + g * len + k)));
        for (int q = 0; q < NX; ++q) sum[q][g] = _mm256_add_epi32(sum[q][g], _mm256_madd_epi16(wv, xv[q]));
      }
    }
    for (int q = 0; q < NX; ++q) {
      const __m256 d = _mm256_set1_ps(xp[q * xs + len / 2 + gi]);
      for (int g = 0; g < G; ++g) acc[q][g] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[q][g]), d, acc[q][g]);
    }
  }
  for (int q = 0; q < NX; ++q)
    for (int g = 0; g < G; ++g) y[q * ystride + row + g] = sum_lanes(acc[q][g]) * w.scales[row + g];
}
#endif

// rows [row, row + G) of an int8 view; prepared x row q at xp + q * xs; y[q * ystride + row].
template <int NX, int G>
inline void dot_block(const Int8Rows& w, const float* xp, int64_t xs, int64_t row, float* y, int64_t ystride) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
#if BM_INT8_INT16_X
  if (w.int16_x()) return dot_block_int16_x<NX, G>(w, xp, xs, row, y, ystride);
#endif
  const float* x = xp;  // the float way: x's dequantized values, len a row
  constexpr int W = lanes<float>;
  constexpr int kLine = 64;  // bytes = elements
  const int64_t len = w.len;
  const int8_t* wr = w.q + row * len;
  vfloat acc[NX][G] = {};
  auto step = [&](int64_t k, int cnt) {
    vfloat wv[G];
    for (int g = 0; g < G; ++g) wv[g] = __builtin_convertvector(vload_i8(wr + g * len + k, cnt), vfloat);
    for (int q = 0; q < NX; ++q) {
      const vfloat xv = vload<float>(x + q * xs + k, cnt);
      for (int g = 0; g < G; ++g) acc[q][g] = madd(acc[q][g], wv[g], xv);
    }
  };
  int64_t k = 0;
  for (; k + kLine <= len; k += kLine) {
    for (int g = 0; g < G; ++g) __builtin_prefetch(wr + (kQuantAheadRows + g) * len + k, 0, 2);  // never faults
    for (int s = 0; s < kLine; s += W) step(k + s, W);
  }
  for (; k + W <= len; k += W) step(k, W);
  if (k < len) step(k, static_cast<int>(len - k));
  for (int q = 0; q < NX; ++q)
    for (int g = 0; g < G; ++g) y[q * ystride + row + g] = hsum(acc[q][g]) * w.scales[row + g];
}

// rows [row, row + G) of an int4 view; prepared x row q at xp + q * xs; y[q * ystride + row]. GS: the group size
// when it is a multiple of the step known at compile time (a vector of full groups unrolled), else 0. The groups
// are taken a vector of them at a time: their scales converted, scale * c added, and the same bytes prefetched
// kQuantAheadRows rows ahead; then each group's sum (a vector a row) is added times its scale.
template <int NX, int G, int GS>
inline void dot_block(const Int4Rows& w, const float* xp, int64_t xs, int64_t row, float* y, int64_t ystride) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  constexpr int W = lanes<float>, S = Int4Rows::kStep;
  const int64_t len = w.len, rb = w.row_bytes(), ng = w.groups(), gs = GS ? GS : w.group;
  const int64_t gstride = GS ? GS : w.group_stride(), corr = w.corrections();
  const uint8_t* wr = w.q + row * rb;
  const vuint low = vuint{} + 0xFu;
  vfloat acc[NX][G] = {};
  float sc[G][W];
  auto group = [&](int64_t gi, int j, int64_t n) {  // group gi (n elements), its scales sc[.][j]
    const uint8_t* wg = wr + gi * gs / 2;
    const float* xg = xp + gi * gstride;
    vfloat part[NX][G] = {};
    auto step = [&](int64_t k, int cnt) {
      vfloat lo[G], b[G];
      for (int g = 0; g < G; ++g) {
        const vuint v = vload_u8(wg + g * rb + k / 2, (cnt + 1) / 2);
        lo[g] = __builtin_convertvector((vint)(v & low), vfloat);
        b[g] = __builtin_convertvector((vint)v, vfloat);
      }
      for (int q = 0; q < NX; ++q) {
        const vfloat xd = vload<float>(xg + q * xs + k, W), xq = vload<float>(xg + q * xs + k + W, W);
        for (int g = 0; g < G; ++g) part[q][g] = madd(madd(part[q][g], lo[g], xd), b[g], xq);
      }
    };
    if (GS && n == GS) {
#pragma GCC unroll 8
      for (int k = 0; k < GS; k += S) step(k, S);
    } else {
      int64_t k = 0;
      for (; k + S <= n; k += S) step(k, S);
      if (k < n) step(k, static_cast<int>(n - k));
    }
    for (int g = 0; g < G; ++g) {
      const vfloat s = bcast(sc[g][j]);
      for (int q = 0; q < NX; ++q) acc[q][g] = madd(acc[q][g], s, part[q][g]);
    }
  };
  for (int64_t g0 = 0; g0 < ng; g0 += W) {
    const int cnt = static_cast<int>(std::min<int64_t>(W, ng - g0));
    int4_scales<G>(w.scales + row * ng, ng, g0, cnt, sc);
    for (int q = 0; q < NX; ++q) {
      const vfloat c = vload<float>(xp + q * xs + corr + g0, W);
      for (int g = 0; g < G; ++g) acc[q][g] = madd(acc[q][g], vload<float>(sc[g], W), c);
    }
    const int64_t b0 = g0 * gs / 2, b1 = std::min(rb, (g0 + cnt) * gs / 2);
    for (int g = 0; g < G; ++g) {
      const uint8_t* ahead = wr + (kQuantAheadRows + g) * rb;  // a prefetch never faults
      for (int64_t b = b0; b < b1; b += 64) __builtin_prefetch(ahead + b, 0, 2);
      __builtin_prefetch(ahead + b1 - 1, 0, 2);
    }
    if (GS && cnt == W && (g0 + W) * gs <= len) {
#pragma GCC unroll 16
      for (int j = 0; j < W; ++j) group(g0 + j, j, GS);
    } else {
      for (int j = 0; j < cnt; ++j) group(g0 + j, j, std::min(len, (g0 + j + 1) * gs) - (g0 + j) * gs);
    }
  }
  for (int q = 0; q < NX; ++q)
    for (int g = 0; g < G; ++g) y[q * ystride + row + g] = hsum(acc[q][g]);
}

#if BM_INT4_INT8_X
// rows [row, row + G) of an int4 view the integer way (Int4Rows::int8_x(): group GS = 32 or 64); prepared x row q at
// xp + q * xs floats. The groups are taken 8 at a time (a chunk: 4 steps of group 32, 8 of group 64): their
// float16 scales converted and multiplied by x's d, c added times the scales, and the same bytes prefetched
// kQuantAheadRows rows ahead; then each step's int32 lanes are multiplied by their group's scales and added. A
// step's scales are an in-lane permute (vpermilps) of a vector ordered once a chunk: group 32 (s0 s2 s4 s6 | s1
// s3 s5 s7), step t's lanes 0-3 group 2t and 4-7 group 2t + 1; group 64 (s0..s3 | s0..s3) and (s4..s7 | s4..s7),
// step t group t. (A cross-lane permute a step, vpermps, cost a quarter of the product's time on Zen 3.) One
// accumulator a row: every row summed in one order whatever G and NX.
template <int NX, int G, int GS>
__attribute__((always_inline)) inline void dot_block_int8_x(const Int4Rows& w, const float* xp, int64_t xs,
                                                            int64_t row, float* y, int64_t ystride) {
  constexpr int kChunk = 8, S = Int4Rows::kIntStep, kSteps = kChunk * GS / S;  // steps a whole chunk
  constexpr int W = lanes<float>;  // (len a multiple of 64: the counts without divisions)
  const int64_t len = w.len, rb = len / 2, ng = len / GS, ngp = (ng + W - 1) / W * W;
  const uint8_t* wr = w.q + row * rb;
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 acc[NX][G];
  for (int q = 0; q < NX; ++q)
    for (int g = 0; g < G; ++g) acc[q][g] = _mm256_setzero_ps();
  // groups [g0, g0 + cnt), cnt <= kChunk (the lambdas inlined: called, their accumulators went through memory)
  auto chunk = [&](int64_t g0, int cnt) __attribute__((always_inline)) {
    __m256 sr[NX][G][GS == 32 ? 1 : 2];  // the chunk's scale[row + g, .] · d[q, .], ordered as above
    for (int g = 0; g < G; ++g) {
      const uint16_t* srow = w.scales + (row + g) * ng + g0;
      __m128i h;
      if (cnt == kChunk) {
        h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(srow));
      } else {
        alignas(16) uint16_t tmp[kChunk] = {};
        std::copy(srow, srow + cnt, tmp);
        h = _mm_load_si128(reinterpret_cast<const __m128i*>(tmp));
      }
      const __m256 sw = _mm256_cvtph_ps(h);
      for (int q = 0; q < NX; ++q) {
        const float* dq = xp + q * xs + len / 4;
        const __m256 sc = _mm256_mul_ps(sw, _mm256_loadu_ps(dq + g0));
        acc[q][g] = _mm256_fmadd_ps(sw, _mm256_loadu_ps(dq + ngp + g0), acc[q][g]);
        if constexpr (GS == 32) {
          sr[q][g][0] = _mm256_permutevar8x32_ps(sc, _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
        } else {
          sr[q][g][0] = _mm256_permute2f128_ps(sc, sc, 0x00);
          sr[q][g][1] = _mm256_permute2f128_ps(sc, sc, 0x11);
        }
      }
    }
    const int64_t b0 = g0 * GS / 2, b1 = (g0 + cnt) * GS / 2;
    for (int g = 0; g < G; ++g) {
      const uint8_t* ahead = wr + (kQuantAheadRows + g) * rb;  // a prefetch never faults
      for (int64_t b = b0; b < b1; b += 64) __builtin_prefetch(ahead + b, 0, 2);
    }
    auto step = [&]<int T>(std::integral_constant<int, T>) __attribute__((always_inline)) {
      const int64_t k = g0 * GS + T * S;  // the step's first element
      __m256i xe[NX], xo[NX];
      for (int q = 0; q < NX; ++q) {
        const int8_t* xb = reinterpret_cast<const int8_t*>(xp + q * xs) + k;
        xe[q] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb));
        xo[q] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + S / 2));
      }
      for (int g = 0; g < G; ++g) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + g * rb + k / 2));
        const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        for (int q = 0; q < NX; ++q) {
          const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xe[q]), _mm256_maddubs_epi16(hi, xo[q]));
          const __m256 f = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
          const __m256 s = _mm256_permute_ps(sr[q][g][T / 4], 0x55 * (T % 4));  // lanes (T % 4, T % 4 + 4)
          acc[q][g] = _mm256_fmadd_ps(f, s, acc[q][g]);
        }
      }
    };
    const int steps = cnt * GS / S;  // the steps 0, 1, ... of the chunk, as constants (the permute's immediate)
    [&]<int... T>(std::integer_sequence<int, T...>) __attribute__((always_inline)) {
      ((T < steps ? step(std::integral_constant<int, T>{}) : void()), ...);
    }(std::make_integer_sequence<int, kSteps>{});
  };
  int64_t g0 = 0;
  for (; g0 + kChunk <= ng; g0 += kChunk) chunk(g0, kChunk);
  if (g0 < ng) chunk(g0, static_cast<int>(ng - g0));
  for (int q = 0; q < NX; ++q) sum_lanes_tree<G>(acc[q], y + q * ystride + row);
}

// n blocks of G rows from row, one call (the block inlined: its constants and frame once, not once a block)
template <int NX, int G, int GS>
__attribute__((noinline)) void dot_blocks_int8_x(const Int4Rows& w, const float* xp, int64_t xs, int64_t row,
                                                 int64_t n, float* y, int64_t ystride) {
  for (int64_t b = 0; b < n; ++b) dot_block_int8_x<NX, G, GS>(w, xp, xs, row + b * G, y, ystride);
}
#endif

// the float way (the integer way: dot_blocks_int8_x, from dot_rows_n): the usual group sizes unrolled for a batch
// of 1 or 2 on AVX2 / AVX-512 (code size and compile time: the generic vector code compiles slowly), any other
// case by the general loop
template <int NX, int G>
inline void dot_block(const Int4Rows& w, const float* xp, int64_t xs, int64_t row, float* y, int64_t ystride) {
#if defined(__AVX2__)
  if constexpr (NX <= 2) {
    constexpr int S = Int4Rows::kStep;
    if (w.group == 32 && 32 % S == 0) return dot_block<NX, G, 32>(w, xp, xs, row, y, ystride);
    if (w.group == 64 && 64 % S == 0) return dot_block<NX, G, 64>(w, xp, xs, row, y, ystride);
  }
#endif
  dot_block<NX, G, 0>(w, xp, xs, row, y, ystride);
}

// weight rows a block: int8 one row at a time, its row then read as one sequential stream (the integer way on a
// 2-core Zen 3 VM: 1.15-1.53x faster than blocks of 4 at a batch of 1 for the model's shapes, 1.1x at 2 or 3,
// even at 4; the four interleaved 768-byte rows of a block streamed no faster than 10-11 GB/s a core, although the
// product runs at 33 GB/s a core from cache: docs/kernels.md; the float way, on CPUs without AVX2 and FMA, takes
// the same blocks, unmeasured, so that one code path is tested); int4 4 at a batch of 1 or 2, 2 beyond
// (registers), except rows of kLongRowBytes or more, one at a time as int8's (out_proj
// and fc2 at hidden 768: 1.3-1.5x on one thread on the Zen 3 VM, the integer way; the float way takes the same
// rule, unmeasured, one code path; 384-byte rows one at a time were up to 13 % slower).
// Eight int4 rows at batch 1 (more independent chains) need 8 scale and 8 accumulator registers of AVX2's 16, and
// spill: 3-15 % slower than four (docs/kernels.md)
template <int NX, typename View>
constexpr int kQuantBlock = std::is_same_v<View, Int8Rows> ? 1 : NX <= 2 ? 4 : 2;
constexpr int64_t kLongRowBytes = 768;

// rows [r0, r1) of a quantized view, for nx rows of (prepared, if View::kPrepared) x, xs floats apart.
template <int NX, typename View>
  requires requires { View::kPrepared; }
inline void dot_rows_n(const View& w, const float* x, int64_t xs, int64_t r0, int64_t r1, float* y, int64_t ystride) {
  constexpr int G = kQuantBlock<NX, View>;
  // n blocks of G rows, then the rest one at a time (int4's long rows: every row)
  int64_t n = (r1 - r0) / G;
  if constexpr (std::is_same_v<View, Int4Rows>) {
    if (w.row_bytes() >= kLongRowBytes) n = 0;
#if BM_INT4_INT8_X
    if (w.int8_x()) {  // the integer way: the blocks, then the rest, each in one call
      auto run = [&]<int GS>() {
        dot_blocks_int8_x<NX, G, GS>(w, x, xs, r0, n, y, ystride);
        dot_blocks_int8_x<NX, 1, GS>(w, x, xs, r0 + n * G, r1 - r0 - n * G, y, ystride);
      };
      if (w.group == 32) run.template operator()<32>();
      else run.template operator()<64>();
      return;
    }
#endif
  }
  int64_t row = r0;
  for (; row < r0 + n * G; row += G) dot_block<NX, G>(w, x, xs, row, y, ystride);
  for (; row < r1; ++row) dot_block<NX, 1>(w, x, xs, row, y, ystride);
}

template <typename View>
  requires requires { View::kPrepared; }
inline void dot_rows(const View& w, const float* x, int64_t xs, int64_t nx, int64_t r0, int64_t r1, float* y,
                     int64_t ystride) {
  switch (nx) {
    case 1: return dot_rows_n<1>(w, x, xs, r0, r1, y, ystride);
    case 2: return dot_rows_n<2>(w, x, xs, r0, r1, y, ystride);
    case 3: return dot_rows_n<3>(w, x, xs, r0, r1, y, ystride);
    case 4: return dot_rows_n<4>(w, x, xs, r0, r1, y, ystride);
    case 5: return dot_rows_n<5>(w, x, xs, r0, r1, y, ystride);
    case 6: return dot_rows_n<6>(w, x, xs, r0, r1, y, ystride);
    case 7: return dot_rows_n<7>(w, x, xs, r0, r1, y, ystride);
    default: return dot_rows_n<8>(w, x, xs, r0, r1, y, ystride);
  }
}

// ---- a fused kernel's projection (csrc/mamba_step.cpp, moe_step.cpp): a plain float32 / bfloat16 matrix
// (PlainRows) or a quantized view, through one interface, so that a kernel templated on it computes exactly what
// bm_gemv / bm_qgemv do for the same rows. ProjInput holds the x rows as the projection reads them: x itself
// (plain), or x prepared once (quantized) by prepare(), which a kernel calls once all of x is written and
// before any thread reads it.
template <typename TW>
struct PlainRows {
  const TW* w;  // (o, len)
  int64_t len;
};

template <typename P> struct ProjInput {
  const float* x = nullptr;
  int64_t stride = 0;
  std::vector<float> buf;
  static constexpr bool kPrepared = [] {
    if constexpr (requires { P::kPrepared; }) return P::kPrepared; else return false;
  }();
  // rows [0, nx) of x (xstride floats apart) for p
  void prepare(const P& p, const float* xr, int64_t xstride, int64_t nx) {
    if constexpr (kPrepared) {
      buf.resize(nx * p.xlen());
      p.prepare_x(xr, xstride, nx, buf.data());
      x = buf.data();
      stride = p.xlen();
    } else {
      x = xr;
      stride = xstride;
    }
  }
};

template <typename TW>
inline void proj_rows(const PlainRows<TW>& p, const ProjInput<PlainRows<TW>>& in, int64_t nx, int64_t r0, int64_t r1,
                      float* y, int64_t ystride) {
  dot_rows(p.w, in.x, in.stride, p.len, nx, r0, r1, y, ystride);
}

template <typename View>
  requires requires { View::kPrepared; }
inline void proj_rows(const View& p, const ProjInput<View>& in, int64_t nx, int64_t r0, int64_t r1, float* y,
                      int64_t ystride) {
  dot_rows(p, in.x, in.stride, nx, r0, r1, y, ystride);
}

// the projection codes of bm_mamba_step / bm_moe_step: 0 plain (the kernel's weight dtype), 1 int8, 2 int4; q,
// scales and group as in bm_qgemv. Calls f(projection-maker) with a maker (weight pointer, scales pointer, len)
// -> projection of that kind; returns false for an unknown code or a bad group.
template <typename TW, typename F>
inline bool with_proj(int quant, int64_t group, F&& f) {
  if (quant == 0) {
    f([](const void* w, const void*, int64_t len) { return PlainRows<TW>{static_cast<const TW*>(w), len}; });
  } else if (quant == 1) {
    if (group != 0) return false;
    f([](const void* q, const void* s, int64_t len) {
      return Int8Rows{static_cast<const int8_t*>(q), static_cast<const float*>(s), len};
    });
  } else if (quant == 2) {
    if (group < 2 || group % 2) return false;
    f([group](const void* q, const void* s, int64_t len) {
      return Int4Rows{static_cast<const uint8_t*>(q), static_cast<const uint16_t*>(s), len, group};
    });
  } else {
    return false;
  }
  return true;
}

}  // namespace bm

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif
