// Causal depthwise conv1d on CPU in the (b, l, d) layout, forward and backward.
//
// With xp = concat(initial state (K-1 steps), x (l steps)) along time:
//   y_t = bias + sum_k w_k xp_{t+k},  final state = xp[l : l+K-1]
//   dxp_u = sum_k w_k dy_{u-k} (0 <= u-k < l) + dfinal_{u-l} (u >= l);  dx = dxp[K-1:], dinit = dxp[:K-1]
//   dw_k = sum_t dy_t xp_{t+k},  dbias = sum_t dy_t
// Channels are vectorised; work items are (batch row, range of channel blocks) walking time outside.
#include "simd.h"

#include <algorithm>
#include <memory>

namespace bm {
namespace {

constexpr int kConvRange = 32;  // blocks per work item

template <typename S, typename T> struct ConvArgs {
  int64_t b, l, d, K, nblk, ranges;
  const T* x;
  int64_t x_sb, x_sl;
  const S* w;     // (d, K)
  const S* bias;  // (d,) or null
  const S* init;  // (b, d, K-1) or null
};

template <typename S> struct ConvRange {
  int64_t lo, hi, nb;
};

template <typename S, typename T> ConvRange<S> conv_range(const ConvArgs<S, T>& a, int64_t r) {
  const int64_t per = (a.nblk + a.ranges - 1) / a.ranges;
  const int64_t lo = std::min(a.nblk, r * per), hi = std::min(a.nblk, (r + 1) * per);
  return {lo, hi, hi - lo};
}

inline int lanes_left(int64_t d0, int64_t d, int W) { return static_cast<int>(std::min<int64_t>(W, d - d0)); }

// Per-item constants: w[j * K + k] (tap k of block j) and the initial state as vectors ini[j * (K-1) + u].
template <typename S, typename T>
void load_constants(const ConvArgs<S, T>& a, int64_t bi, ConvRange<S> rg, Vec<S>* w, Vec<S>* ini) {
  constexpr int W = lanes<S>;
  const int64_t K = a.K;
  for (int64_t j = 0; j < rg.nb; ++j) {
    const int64_t d0 = (rg.lo + j) * W;
    const int cnt = lanes_left(d0, a.d, W);
    for (int64_t k = 0; k < K; ++k) {
      w[j * K + k] = Vec<S>{};
      for (int i = 0; i < cnt; ++i) w[j * K + k][i] = a.w[(d0 + i) * K + k];
    }
    for (int64_t u = 0; u < K - 1; ++u) {
      ini[j * (K - 1) + u] = Vec<S>{};
      if (a.init)
        for (int i = 0; i < cnt; ++i) ini[j * (K - 1) + u][i] = a.init[(bi * a.d + d0 + i) * (K - 1) + u];
    }
  }
}

// xp_u for block j
template <typename S, typename T>
inline Vec<S> xp(const ConvArgs<S, T>& a, int64_t bi, const Vec<S>* ini, int64_t j, int64_t d0, int cnt, int64_t u) {
  if (u >= a.K - 1) return vload_as<S>(a.x + bi * a.x_sb + (u - a.K + 1) * a.x_sl + d0, cnt);
  return ini[j * (a.K - 1) + u];
}

template <typename S, typename T>
void conv_forward_item(const ConvArgs<S, T>& a, T* y, S* final_state, int64_t bi, int64_t r) {
  constexpr int W = lanes<S>;
  const auto rg = conv_range(a, r);
  if (rg.nb <= 0) return;
  const int64_t K = a.K;
  std::unique_ptr<Vec<S>[]> w(new Vec<S>[rg.nb * K]), ini(new Vec<S>[rg.nb * std::max<int64_t>(K - 1, 1)]);
  load_constants(a, bi, rg, w.get(), ini.get());
  for (int64_t t = 0; t < a.l; ++t) {
    for (int64_t j = 0; j < rg.nb; ++j) {
      const int64_t d0 = (rg.lo + j) * W;
      const int cnt = lanes_left(d0, a.d, W);
      Vec<S> acc = a.bias ? vload<S>(a.bias + d0, cnt) : Vec<S>{};
      for (int64_t k = 0; k < K; ++k) acc += w[j * K + k] * xp(a, bi, ini.get(), j, d0, cnt, t + k);
      vstore_as<S>(y + (bi * a.l + t) * a.d + d0, acc, cnt);
    }
  }
  for (int64_t j = 0; j < rg.nb; ++j) {
    const int64_t d0 = (rg.lo + j) * W;
    const int cnt = lanes_left(d0, a.d, W);
    for (int64_t u = 0; u < K - 1; ++u) {
      const Vec<S> v = xp(a, bi, ini.get(), j, d0, cnt, a.l + u);
      for (int i = 0; i < cnt; ++i) final_state[(bi * a.d + d0 + i) * (K - 1) + u] = v[i];
    }
  }
}

template <typename S, typename T> struct ConvGrads {
  const T* dy;       // (b, l, d) contiguous
  const S* dfinal;   // (b, d, K-1) or null
  T* dx;             // (b, l, d)
  S* dinit;          // (b, d, K-1)
  S* dw;             // (b, d, K) per-row partial sums
  S* dbias;          // (b, d) per-row partial sums
};

template <typename S, typename T>
void conv_backward_item(const ConvArgs<S, T>& a, const ConvGrads<S, T>& g, int64_t bi, int64_t r) {
  constexpr int W = lanes<S>;
  const auto rg = conv_range(a, r);
  if (rg.nb <= 0) return;
  const int64_t K = a.K, l = a.l;
  std::unique_ptr<Vec<S>[]> w(new Vec<S>[rg.nb * K]), ini(new Vec<S>[rg.nb * std::max<int64_t>(K - 1, 1)]);
  std::unique_ptr<Vec<S>[]> dw(new Vec<S>[rg.nb * K]()), db(new Vec<S>[rg.nb]());
  std::unique_ptr<Vec<S>[]> dini(new Vec<S>[rg.nb * std::max<int64_t>(K - 1, 1)]());
  load_constants(a, bi, rg, w.get(), ini.get());
  auto dy = [&](int64_t t, int64_t d0, int cnt) {
    return (t >= 0 && t < l) ? vload_as<S>(g.dy + (bi * l + t) * a.d + d0, cnt) : Vec<S>{};
  };
  for (int64_t u = 0; u < l + K - 1; ++u) {
    for (int64_t j = 0; j < rg.nb; ++j) {
      const int64_t d0 = (rg.lo + j) * W;
      const int cnt = lanes_left(d0, a.d, W);
      Vec<S> acc = Vec<S>{};
      for (int64_t k = 0; k < K; ++k) acc += w[j * K + k] * dy(u - k, d0, cnt);
      if (u >= l && g.dfinal) {
        for (int i = 0; i < cnt; ++i) acc[i] += g.dfinal[(bi * a.d + d0 + i) * (K - 1) + (u - l)];
      }
      if (u >= K - 1) {
        vstore_as<S>(g.dx + (bi * l + u - K + 1) * a.d + d0, acc, cnt);
      } else {
        dini[j * (K - 1) + u] = acc;
      }
      if (u < l) {  // parameter gradients, indexed by output step t = u
        const Vec<S> gy = dy(u, d0, cnt);
        db[j] += gy;
        for (int64_t k = 0; k < K; ++k) dw[j * K + k] += gy * xp(a, bi, ini.get(), j, d0, cnt, u + k);
      }
    }
  }
  for (int64_t j = 0; j < rg.nb; ++j) {
    const int64_t d0 = (rg.lo + j) * W;
    const int cnt = lanes_left(d0, a.d, W);
    for (int i = 0; i < cnt; ++i) {
      g.dbias[bi * a.d + d0 + i] = db[j][i];
      for (int64_t k = 0; k < K; ++k) g.dw[(bi * a.d + d0 + i) * K + k] = dw[j * K + k][i];
      for (int64_t u = 0; u < K - 1; ++u) g.dinit[(bi * a.d + d0 + i) * (K - 1) + u] = dini[j * (K - 1) + u][i];
    }
  }
}

template <typename S, typename T> ConvArgs<S, T> conv_args(const void* x, int64_t x_sb, int64_t x_sl, const void* w,
                                                           const void* bias, const void* init, int64_t b, int64_t l,
                                                           int64_t d, int64_t K, int threads) {
  ConvArgs<S, T> a;
  a.b = b;
  a.l = l;
  a.d = d;
  a.K = K;
  a.nblk = (d + lanes<S> - 1) / lanes<S>;
  const int64_t by_size = (a.nblk + kConvRange - 1) / kConvRange;
  const int64_t by_threads = (threads + b - 1) / std::max<int64_t>(b, 1);
  a.ranges = std::max<int64_t>(1, std::min(a.nblk, std::max(by_size, by_threads)));
  a.x = static_cast<const T*>(x);
  a.x_sb = x_sb;
  a.x_sl = x_sl;
  a.w = static_cast<const S*>(w);
  a.bias = static_cast<const S*>(bias);
  a.init = static_cast<const S*>(init);
  return a;
}

// dtype codes as in scan.h: x 0 float32, 1 bfloat16, 2 float64 (then everything is float64).
template <typename F> bool conv_dispatch(int dtype_x, F&& fn) {
  if (dtype_x == 0) return fn.template operator()<float, float>(), true;
  if (dtype_x == 1) return fn.template operator()<float, bf16>(), true;
  if (dtype_x == 2) return fn.template operator()<double, double>(), true;
  return false;
}

}  // namespace
}  // namespace bm

extern "C" {

// x (b, l, d) with strides (x_sb, x_sl, 1); w (d, K), bias (d,) or null, init (b, d, K-1) or null:
// compute dtype. y (b, l, d) contiguous of x's dtype; final_state (b, d, K-1) compute dtype.
int bm_conv_forward(int dtype_x, const void* x, int64_t x_sb, int64_t x_sl, const void* w, const void* bias,
                    const void* init, void* y, void* final_state, int64_t b, int64_t l, int64_t d, int64_t K,
                    int threads) {
  using namespace bm;
  return conv_dispatch(dtype_x, [&]<typename S, typename T>() {
    const auto a = conv_args<S, T>(x, x_sb, x_sl, w, bias, init, b, l, d, K, threads);
    parallel_for(b * a.ranges, threads, [&](int64_t i) {
      conv_forward_item(a, static_cast<T*>(y), static_cast<S*>(final_state), i / a.ranges, i % a.ranges);
    });
  }) ? 0 : 2;
}

// dy, dx (b, l, d) contiguous of x's dtype; dfinal (b, d, K-1) or null; dinit (b, d, K-1); per-batch-row
// partial sums dw (b, d, K) and dbias (b, d): compute dtype.
int bm_conv_backward(int dtype_x, const void* x, int64_t x_sb, int64_t x_sl, const void* w, const void* init,
                     const void* dy, const void* dfinal, void* dx, void* dinit, void* dw, void* dbias, int64_t b,
                     int64_t l, int64_t d, int64_t K, int threads) {
  using namespace bm;
  return conv_dispatch(dtype_x, [&]<typename S, typename T>() {
    const auto a = conv_args<S, T>(x, x_sb, x_sl, w, nullptr, init, b, l, d, K, threads);
    ConvGrads<S, T> g{static_cast<const T*>(dy), static_cast<const S*>(dfinal), static_cast<T*>(dx),
                      static_cast<S*>(dinit), static_cast<S*>(dw), static_cast<S*>(dbias)};
    parallel_for(b * a.ranges, threads, [&](int64_t i) { conv_backward_item(a, g, i / a.ranges, i % a.ranges); });
  }) ? 0 : 2;
}

}  // extern "C"
