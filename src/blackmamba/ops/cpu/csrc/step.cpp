// One decode step of the Mamba mixer on CPU: the SSM update and the causal-conv shift, each one pass
// over the state, in place. Work per token is O(d n) and independent of how many tokens came before.
#include "simd.h"

#include <algorithm>

namespace bm {
namespace {

inline float hsum(vfloat v) {
  float s = 0;
  for (int i = 0; i < lanes<float>; ++i) s += v[i];
  return s;
}

// conv accumulator: float64 for float64 data, float32 otherwise
template <typename T> using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T> inline T from_acc(acc_t<T> v) {
  if constexpr (std::is_same_v<T, bf16>) {
    return to_bf16(v);
  } else {
    return static_cast<T>(v);
  }
}

template <typename T>
void conv_step(const T* x, const T* w, const T* bias, T* state, T* y, int64_t b, int64_t d, int64_t K, int threads) {
  constexpr int64_t grain = 1024;
  parallel_for((b * d + grain - 1) / grain, threads, [&](int64_t chunk) {
    const int64_t i1 = std::min(b * d, (chunk + 1) * grain);
    for (int64_t i = chunk * grain; i < i1; ++i) {
      const int64_t di = i % d;
      const T* wi = w + di * K;
      T* s = state + i * (K - 1);
      acc_t<T> out = bias ? to_float(bias[di]) : acc_t<T>(0);
      for (int64_t k = 0; k < K - 1; ++k) out += to_float(wi[k]) * to_float(s[k]);
      out += to_float(wi[K - 1]) * to_float(x[i]);
      for (int64_t k = 0; k + 1 < K - 1; ++k) s[k] = s[k + 1];
      if (K > 1) s[K - 2] = x[i];
      y[i] = from_acc<T>(out);
    }
  });
}

}  // namespace
}  // namespace bm

extern "C" {

// x, delta, z (b, d); B, C (b, n); A (d, n); D (d,); state (b, d, n): float32, contiguous; z, D may be
// null. Updates state in place, writes y (b, d). The state is vectorised along n, one channel at a time.
void bm_ssm_step(const float* x, const float* delta, const float* A, const float* B, const float* C,
                 const float* D, const float* z, float* state, float* y, int64_t b, int64_t d, int64_t n,
                 int threads) {
  using namespace bm;
  constexpr int W = lanes<float>;
  constexpr int64_t grain = 256;
  parallel_for((b * d + grain - 1) / grain, threads, [&](int64_t chunk) {
    const int64_t i1 = std::min(b * d, (chunk + 1) * grain);
    for (int64_t i = chunk * grain; i < i1; ++i) {
      const int64_t bi = i / d, di = i % d;
      const float dl = delta[i], xv = x[i];
      float* s = state + i * n;
      vfloat acc = {};
      for (int64_t k = 0; k < n; k += W) {
        const int cnt = static_cast<int>(std::min<int64_t>(W, n - k));
        const vfloat a = vexp(dl * vload<float>(A + di * n + k, cnt));
        const vfloat sv = a * vload<float>(s + k, cnt) + (dl * xv) * vload<float>(B + bi * n + k, cnt);
        vstore_as<float>(s + k, sv, cnt);
        acc += sv * vload<float>(C + bi * n + k, cnt);
      }
      float out = hsum(acc);
      if (D) out += D[di] * xv;
      if (z) out *= z[i] / (1.0f + std::exp(-z[i]));
      y[i] = out;
    }
  });
}

// x, y (b, d); weight (d, K); bias (d,) or null; state (b, d, K-1) oldest first, shifted in place.
// All of one dtype (0 float32, 1 bfloat16, 2 float64), contiguous; accumulates in float32 (float64).
int bm_conv_step(int dtype, const void* x, const void* w, const void* bias, void* state, void* y, int64_t b,
                 int64_t d, int64_t K, int threads) {
  using namespace bm;
  switch (dtype) {
    case 0:
      conv_step(static_cast<const float*>(x), static_cast<const float*>(w), static_cast<const float*>(bias),
                static_cast<float*>(state), static_cast<float*>(y), b, d, K, threads);
      return 0;
    case 1:
      conv_step(static_cast<const bf16*>(x), static_cast<const bf16*>(w), static_cast<const bf16*>(bias),
                static_cast<bf16*>(state), static_cast<bf16*>(y), b, d, K, threads);
      return 0;
    case 2:
      conv_step(static_cast<const double*>(x), static_cast<const double*>(w), static_cast<const double*>(bias),
                static_cast<double*>(state), static_cast<double*>(y), b, d, K, threads);
      return 0;
  }
  return 2;
}

}  // extern "C"
