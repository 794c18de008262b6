// The block entry, residual add + RMSNorm, for rows of H values (see ops/norm.py):
//   r = h + residual (residual absent in the first block), rounded as torch's sum would be, stored as TR;
//   x = r rounded to TW (as residual.to(weight.dtype) does);
//   out = x * rsqrt(mean(x^2) + eps) * w, stored as TW.
// h: TH; residual and the new residual: TR; weight and out: TW; each float32 or bfloat16.
#include "simd.h"

#include <algorithm>
#include <type_traits>

namespace bm {
namespace {

// v rounded to T's precision (and back to float32): identity for float, round-to-nearest-even for bf16
template <typename T> inline vfloat round_to(vfloat v) {
  if constexpr (std::is_same_v<T, bf16>) {
    vuint u = (vuint)v;
    u = ((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16) << 16;
    return (vfloat)u;
  } else {
    return v;
  }
}

template <typename TH, typename TR, typename TW>
void add_rmsnorm(const TH* h, const TR* res, const TW* w, TW* out, TR* res_out, int64_t rows, int64_t H, float eps,
                 int threads) {
  constexpr int L = lanes<float>;
  parallel_for(rows, threads, [&](int64_t q) {
    const TH* hq = h + q * H;
    const TR* rq = res ? res + q * H : nullptr;
    TR* roq = res_out + q * H;
    TW* oq = out + q * H;
    // h + residual is a bfloat16 tensor in torch only when both are (or h alone is, in the first block)
    const bool sum_bf16 = std::is_same_v<TH, bf16> && (!rq || std::is_same_v<TR, bf16>);
    vfloat sumsq = {};
    for (int64_t k = 0; k < H; k += L) {
      const int cnt = static_cast<int>(std::min<int64_t>(L, H - k));
      vfloat r = vload_as<float>(hq + k, cnt);
      if (rq) r += vload_as<float>(rq + k, cnt);
      if (sum_bf16) r = round_to<bf16>(r);
      vstore_as<float>(roq + k, r, cnt);
      const vfloat x = round_to<TW>(r);
      vstore_as<float>(oq + k, x, cnt);  // exact in TW: read back below
      sumsq += x * x;
    }
    float ss = 0;
    for (int i = 0; i < L; ++i) ss += sumsq[i];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(H) + eps);
    for (int64_t k = 0; k < H; k += L) {
      const int cnt = static_cast<int>(std::min<int64_t>(L, H - k));
      vstore_as<float>(oq + k, vload_as<float>(oq + k, cnt) * inv * vload_as<float>(w + k, cnt), cnt);
    }
  });
}

template <typename F> bool with_type(int code, F&& fn) {
  if (code == 0) return fn.template operator()<float>(), true;
  if (code == 1) return fn.template operator()<bf16>(), true;
  return false;
}

}  // namespace
}  // namespace bm

extern "C" {

// h (rows, H) dtype_h; residual (rows, H) dtype_r or null; res_out (rows, H) dtype_r; weight (H,) and
// out (rows, H) dtype_w; all contiguous. Dtype codes: 0 float32, 1 bfloat16. 0 on success.
int bm_add_rmsnorm(int dtype_h, int dtype_r, int dtype_w, const void* h, const void* residual, const void* weight,
                   void* out, void* res_out, int64_t rows, int64_t H, float eps, int threads) {
  using namespace bm;
  bool ok = false;
  with_type(dtype_h, [&]<typename TH>() {
    with_type(dtype_r, [&]<typename TR>() {
      ok = with_type(dtype_w, [&]<typename TW>() {
        add_rmsnorm<TH, TR, TW>(static_cast<const TH*>(h), static_cast<const TR*>(residual),
                                static_cast<const TW*>(weight), static_cast<TW*>(out), static_cast<TR*>(res_out), rows,
                                H, eps, threads);
      });
    });
  });
  return ok ? 0 : 1;
}

}  // extern "C"
