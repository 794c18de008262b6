// The experts' activations and their derivatives, vectorised (grouped_mlp.cpp, moe_step.cpp).
#pragma once

#include "simd.h"

#include <algorithm>
#include <cstdint>

namespace bm {

constexpr int kSilu = 0, kGelu = 1;  // ops/cpu/build.py ACTIVATION_CODE

// y = act(a) and dy = act'(a). silu: a * sigmoid(a). gelu (exact erf form): a * Phi(a), Phi the normal CDF,
// from erfc by Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7), taken on |a| so that the negative tail
// keeps its relative accuracy; Phi'(a) = exp(-a^2 / 2) / sqrt(2 pi) reuses the same exp.
template <int A> inline void activation(vfloat a, vfloat& y, vfloat& dy) {
  if constexpr (A == kSilu) {
    const vfloat s = 1.0f / (1.0f + vexp(-a));
    y = a * s;
    dy = s + y * (1.0f - s);
  } else {
    const vfloat x = (a < 0.0f ? -a : a) * 0.70710678118654752f;
    const vfloat e = vexp(-x * x);
    const vfloat t = 1.0f / (1.0f + 0.3275911f * x);
    const vfloat q = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f +
                                                                                     t * 1.061405429f)))) * e;
    const vfloat phi = a < 0.0f ? 0.5f * q : 1.0f - 0.5f * q;  // erfc(x) = q: Phi(a) = erfc(-a / sqrt 2) / 2
    y = a * phi;
    dy = phi + a * e * 0.39894228040143268f;
  }
}

// g (m, F) = act(a) * b, [a | b] = h (m, 2F); g may be a itself (ldg = ldh, same memory)
template <int A> void gate_rows(const float* h, int64_t ldh, float* g, int64_t ldg, int64_t m, int64_t F) {
  constexpr int L = lanes<float>;
  for (int64_t r = 0; r < m; ++r) {
    const float* a = h + r * ldh;
    float* gr = g + r * ldg;
    for (int64_t k = 0; k < F; k += L) {
      const int cnt = static_cast<int>(std::min<int64_t>(L, F - k));
      vfloat y, dy;
      activation<A>(vload<float>(a + k, cnt), y, dy);
      vstore_as<float>(gr + k, y * vload<float>(a + F + k, cnt), cnt);
    }
  }
}

}  // namespace bm
