// Portable SIMD helpers for the fused CPU kernels: GCC/Clang vector extensions, so one source
// compiles to AVX-512, AVX2 or NEON depending on the -march the extension is built with.
//
//   Vec<S>       a vector of S (float or double) as wide as the machine's widest registers
//   lanes<S>     how many S it holds
//   vload / vstore   from / to float, double or bfloat16 memory; `cnt` < lanes reads/writes a partial
//                    vector (the missing lanes read as 0)
//   parallel_for     OpenMP over work items
//   vexp         exp: float uses a Cody-Waite reduction + degree-6 polynomial (about 2 ulp, validated
//                against torch.exp by the tests); double uses std::exp lane by lane (tests only)
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

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

// ---- exp
inline vfloat vexp(vfloat x) {
  const vfloat lo = splat<float>(-87.3f), hi = splat<float>(88.3f);
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  // x = n ln2 + r with n = round(x / ln2), |r| <= ln2 / 2; rounding by the 1.5 * 2^23 trick
  const vfloat magic = splat<float>(12582912.0f);
  vfloat t = x * 1.44269504088896341f + magic;
  vfloat n = t - magic;
  vint ni = (vint)t - (vint)magic;
  vfloat r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  // exp(r) = 1 + r + r^2 p(r)  (Cephes expf coefficients)
  vfloat p = r * 1.9875691500E-4f + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * (r * r) + r + 1.0f;
  vfloat scale = (vfloat)((ni + 127) << 23);  // 2^n, n in [-126, 127]
  return p * scale;
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
