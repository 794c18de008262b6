// Portable SIMD helpers for the fused CPU kernels: GCC/Clang vector extensions, so one source
// compiles to AVX-512, AVX2 or NEON depending on the -march the extension is built with.
//
//   Vec<S>       a vector of S (float or double) as wide as the machine's widest registers
//   lanes<S>     how many S it holds
//   vload / vstore   from / to float, double or bfloat16 memory; `cnt` < lanes reads/writes a partial
//                    vector (the missing lanes read as 0)
//   vload_i8 / vload_u8   int8 / uint8 memory -> 32-bit lanes, one byte a lane (quantized weights)
//   half_to_float    a float16's bits -> float
//   parallel_for     OpenMP over work items
//   vexp2, vexp  2^x and e^x: float uses a range reduction + a degree-5/6 polynomial (1-2 ulp,
//                validated against torch.exp by the tests), with AVX-512's vreduceps/vscalefps where
//                available; double uses the C library lane by lane (float64 is for gradcheck only)
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace bm {

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#else
constexpr int kVecBytes = 32;
#endif

typedef float vfloat __attribute__((vector_size(kVecBytes)));
typedef double vdouble __attribute__((vector_size(kVecBytes)));
typedef int32_t vint __attribute__((vector_size(kVecBytes)));
typedef uint32_t vuint __attribute__((vector_size(kVecBytes)));
typedef uint16_t vhalf __attribute__((vector_size(kVecBytes / 2)));

template <typename S> struct VecOf;
template <> struct VecOf<float> { using type = vfloat; };
template <> struct VecOf<double> { using type = vdouble; };
template <typename S> using Vec = typename VecOf<S>::type;
template <typename S> constexpr int lanes = kVecBytes / sizeof(S);

// bfloat16 storage: the upper half of a float32
struct bf16 {
  uint16_t bits;
};

inline float to_float(bf16 v) {
  const uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline float to_float(float v) { return v; }
inline double to_float(double v) { return v; }

inline bf16 to_bf16(float f) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return bf16{static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16)};
}

// ---- loads: memory of type T -> Vec<S>
template <typename S, typename T>
inline Vec<S> vload_partial(const T* p, int cnt) {
  Vec<S> v = {};
  for (int i = 0; i < cnt; ++i) v[i] = static_cast<S>(to_float(p[i]));
  return v;
}

template <typename S> inline Vec<S> vload(const S* p, int cnt) {
  if (cnt == lanes<S>) {
    Vec<S> v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  return vload_partial<S>(p, cnt);
}

inline vfloat vload_bf16(const bf16* p, int cnt) {
#if defined(__AVX512F__)
  if (cnt == lanes<float>)  // one vpmovzxwd: the generic code below compiles to four shuffles here
    return (vfloat)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))),
                                     16);
#endif
  if (cnt == lanes<float>) {
    vhalf h;
    std::memcpy(&h, p, sizeof h);
    vuint u = __builtin_convertvector(h, vuint) << 16;
    return (vfloat)u;
  }
  return vload_partial<float>(p, cnt);
}

template <typename S, typename T> inline Vec<S> vload_as(const T* p, int cnt) {
  if constexpr (std::is_same_v<T, bf16>) {
    return vload_bf16(p, cnt);
  } else {
    static_assert(std::is_same_v<S, T>, "unsupported load");
    return vload<S>(p, cnt);
  }
}

// ---- stores: Vec<S> -> memory of type T (bf16: round to nearest even)
template <typename S, typename T> inline void vstore_as(T* p, Vec<S> v, int cnt) {
  if constexpr (std::is_same_v<T, bf16>) {
    if (cnt == lanes<float>) {
      vuint u = (vuint)v;
      u = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
      vhalf h = __builtin_convertvector(u, vhalf);
      std::memcpy(p, &h, sizeof h);
    } else {
      for (int i = 0; i < cnt; ++i) p[i] = to_bf16(v[i]);
    }
  } else {
    static_assert(std::is_same_v<S, T>, "unsupported store");
    if (cnt == lanes<S>) {
      std::memcpy(p, &v, sizeof v);
    } else {
      for (int i = 0; i < cnt; ++i) p[i] = v[i];
    }
  }
}

template <typename S> inline Vec<S> splat(S a) { return Vec<S>{} + a; }

// ---- quantized weights (ops/quant.py): bytes -> 32-bit lanes, one byte a lane (vpmovsxbd / vpmovzxbd; GCC
// scalarises __builtin_convertvector from an 8-byte vector). `cnt` < lanes<float> reads only cnt bytes (the
// missing lanes read as 0).
typedef int8_t vqi8 __attribute__((vector_size(kVecBytes / 4)));
typedef uint8_t vqu8 __attribute__((vector_size(kVecBytes / 4)));

template <bool Signed> inline vint vload_byte_lanes(const void* p, int cnt) {
  alignas(16) uint8_t buf[kVecBytes / 4] = {};
  if (cnt < lanes<float>) {
    std::memcpy(buf, p, cnt);
    p = buf;
  }
#if defined(__AVX512F__)
  const __m128i b = _mm_loadu_si128(static_cast<const __m128i*>(p));
  return (vint)(Signed ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b));
#elif defined(__AVX2__)
  const __m128i b = _mm_loadl_epi64(static_cast<const __m128i*>(p));
  return (vint)(Signed ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b));
#else
  if constexpr (Signed) {
    vqi8 b;
    std::memcpy(&b, p, sizeof b);
    return __builtin_convertvector(b, vint);
  } else {
    vqu8 b;
    std::memcpy(&b, p, sizeof b);
    return __builtin_convertvector(b, vint);
  }
#endif
}

inline vint vload_i8(const int8_t* p, int cnt) { return vload_byte_lanes<true>(p, cnt); }
inline vuint vload_u8(const uint8_t* p, int cnt) { return (vuint)vload_byte_lanes<false>(p, cnt); }

// float16 (IEEE binary16 bits) -> float, exact: vcvtph2ps where there is F16C, else by the bits.
inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
  uint32_t u;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in float
    const float f = static_cast<float>(mant) * 5.9604644775390625e-8f;
    std::memcpy(&u, &f, sizeof u);
    u |= sign;
  } else if (exp == 31) {
    u = sign | 0x7F800000u | (mant << 13);
  } else {
    u = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// ---- exp
template <typename S> constexpr S kLog2e = S(1.44269504088896340736);
template <typename S> constexpr S kLn2 = S(0.69314718055994530942);

#if defined(__AVX512F__) && defined(__AVX512DQ__)
// 2^t = 2^floor(t + 1/2) * 2^(u - 1/2) with u = frac(t + 1/2): the +1/2 fuses into the caller's
// multiply, vreduceps gives u, a degree-5 polynomial (fitted for minimal relative error: 7.5e-8
// before rounding, 1.9e-7 after float32 evaluation) gives 2^(u - 1/2), vscalefps applies 2^floor with
// exact underflow to 0 and overflow to inf. 8 instructions: the scan forward is bound by instruction
// throughput (about 10 vector instructions per state update); degree 6 was 2-5% slower.
inline vfloat vexp2(vfloat t) {
  const vfloat th = t + 0.5f;
  const vfloat u = (vfloat)_mm512_reduce_ps((__m512)th, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  vfloat p = u * 1.32764713e-3f + 6.35642326e-3f;
  p = p * u + 3.94751690e-2f;
  p = p * u + 1.69814244e-1f;
  p = p * u + 4.90133226e-1f;
  p = p * u + 7.07106709e-1f;
  return (vfloat)_mm512_scalef_ps((__m512)p, (__m512)th);
}
#else
// Portable: 2^t = 2^n * 2^f with n = round(t) by the 1.5 * 2^23 trick, 2^n from the exponent bits
// (t clamped to [-126, 127]; below -126 the result is 0) and 2^f, |f| <= 1/2, by a degree-6
// polynomial (2e-9 before rounding).
inline vfloat vexp2(vfloat t) {
  const auto underflow = t < -126.0f;  // 2^t below the smallest normal float: 0 (no denormals here)
  t = underflow ? splat<float>(-126.0f) : t;
  t = t > 127.0f ? splat<float>(127.0f) : t;
  const vfloat magic = splat<float>(12582912.0f);
  const vfloat tm = t + magic;
  const vint n = (vint)tm - (vint)magic;
  const vfloat f = t - (tm - magic);
  vfloat p = f * 1.5353342e-4f + 1.3398872e-3f;
  p = p * f + 9.6184374e-3f;
  p = p * f + 5.5503325e-2f;
  p = p * f + 2.4022648e-1f;
  p = p * f + 6.9314720e-1f;
  p = p * f + 1.0f;
  return underflow ? vfloat{} : p * (vfloat)((n + 127) << 23);
}
#endif

inline vfloat vexp(vfloat x) { return vexp2(x * kLog2e<float>); }

inline vdouble vexp2(vdouble x) {
  for (int i = 0; i < lanes<double>; ++i) x[i] = std::exp2(x[i]);
  return x;
}

inline vdouble vexp(vdouble x) {
  for (int i = 0; i < lanes<double>; ++i) x[i] = std::exp(x[i]);
  return x;
}

template <typename V> inline V vsigmoid(V x) { return 1 / (1 + vexp(-x)); }

// Run f(i) for i in [0, n) on up to `threads` OpenMP threads, in contiguous static chunks.
template <typename F> inline void parallel_for(int64_t n, int threads, const F& f) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n > 1)
  for (int64_t i = 0; i < n; ++i) f(i);
}

}  // namespace bm
