// One decode step of the whole Mamba mixer for a few sequences, in one call and one pass over each
// weight matrix (decode is limited by reading the weights):
//   x, z = split(h W_in^T);  x = silu(conv_step(x));  dt, B, C = split(x W_x^T)
//   delta = softplus(dt W_dt^T + b_dt);  s = exp(delta A) s + delta B x   (A = -exp(A_log), given)
//   y = (<s, C> + D x) silu(z);  out = y W_out^T
// Weights (and conv weight / bias, dt bias) are float32 or bfloat16 (TW), the three projections (in, x, out)
// possibly int8 / int4 instead (P: dot.h's PlainRows<TW>, Int8Rows or Int4Rows, summed as bm_gemv / bm_qgemv sum
// them); the conv state has the same dtype or float32 (TS); h and out are float32 or bfloat16 (TH); the activations inside,
// A, D and the SSM state are float32. One OpenMP region per
// call, three barriers.
#include "dot.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include <omp.h>

namespace bm {
namespace {

template <typename T> inline float val(const T* p, int64_t i) { return to_float(p[i]); }

template <typename T> inline T from_float(float v) {
  if constexpr (std::is_same_v<T, bf16>) {
    return to_bf16(v);
  } else {
    return v;
  }
}


// softplus(v) = max(v, 0) + log1p(exp(-|v|)), with log1p(e) = 2 atanh(e / (2 + e)) by its odd series
// (e <= 1, so the ratio is <= 1/3 and six terms give ~1e-7)
inline vfloat vsoftplus(vfloat v) {
  const vfloat zero = {};
  const vfloat e = vexp(v < zero ? v : -v);
  const vfloat t = e / (2.0f + e), t2 = t * t;
  vfloat p = t2 * (1.0f / 11) + 1.0f / 9;
  p = p * t2 + 1.0f / 7;
  p = p * t2 + 1.0f / 5;
  p = p * t2 + 1.0f / 3;
  p = p * t2 + 1.0f;
  return (v > zero ? v : zero) + 2.0f * t * p;
}

// one channel's causal conv step of width K: acc = bias + sum_k w[k] s[k] (k < K-1, in order) + w[K-1] xin; the
// state (K-1 values) shifted by one and xin appended. KC: K known at compile time (the loops unrolled), or 0
template <int KC, typename TW, typename TS>
inline float conv_channel(const TW* w, float bias, TS* s, float xin, int64_t width) {
  const int64_t K = KC > 0 ? KC : width;
  float acc = bias;
  for (int64_t k = 0; k < K - 1; ++k) acc += to_float(w[k]) * to_float(s[k]);
  acc += to_float(w[K - 1]) * xin;
  for (int64_t k = 0; k + 1 < K - 1; ++k) s[k] = s[k + 1];
  if (K > 1) s[K - 2] = from_float<TS>(xin);
  return acc;
}

constexpr int64_t kRowBlock = 16;  // weight rows per OpenMP work item in the projections

struct StepShape {
  int64_t b, H, I, N, R, K;
};

template <typename TH, typename TW, typename TS, typename P>
void mamba_step(const StepShape& sh, const TH* h_in, const P& w_in, const TW* conv_w, const TW* conv_b,
                const P& w_x, const TW* w_dt, const TW* b_dt, const float* A, const float* D, const P& w_out,
                TS* conv_state, float* ssm, TH* out_h, int threads) {
  const int64_t b = sh.b, H = sh.H, I = sh.I, N = sh.N, R = sh.R, K = sh.K, Pr = R + 2 * N;
  std::vector<float> xz(b * 2 * I), xs(b * I), dbc(b * Pr), y(b * I), hbuf, obuf;
  const float* h;  // h and out in float32: the caller's own memory when that is float32
  float* out;
  if constexpr (std::is_same_v<TH, float>) {
    h = h_in;
    out = out_h;
  } else {
    hbuf.resize(b * H);
    obuf.resize(b * H);
    for (int64_t i = 0; i < b * H; ++i) hbuf[i] = to_float(h_in[i]);
    h = hbuf.data();
    out = obuf.data();
  }
  constexpr int W = lanes<float>;
  ProjInput<P> in_h, in_xs, in_y;  // the projections' inputs (quantized: prepared, the last two between barriers)
  in_h.prepare(w_in, h, H, b);
  if constexpr (!ProjInput<P>::kPrepared) {  // x read where it is: only the pointers to set
    in_xs.prepare(w_x, xs.data(), I, b);
    in_y.prepare(w_out, y.data(), I, b);
  }
#pragma omp parallel num_threads(threads)
  {
    // 1-2. in_proj rows of this thread's channels (x and z), then their conv step (state shifted in
    // place) + silu: the same thread owns the channels in both, so no barrier in between
    const int64_t nthr = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t per = (I + nthr * W - 1) / (nthr * W) * W;
    const int64_t c0 = std::min(I, tid * per), c1 = std::min(I, c0 + per);
    proj_rows(w_in, in_h, b, c0, c1, xz.data(), 2 * I);
    proj_rows(w_in, in_h, b, I + c0, I + c1, xz.data(), 2 * I);
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t q = 0; q < b; ++q) {
        const float bias = conv_b ? val(conv_b, c) : 0.0f, xin = xz[q * 2 * I + c];
        TS* s = conv_state + (q * I + c) * (K - 1);
        xs[q * I + c] = K == 4 ? conv_channel<4>(conv_w + c * K, bias, s, xin, K)  // Mamba's width, unrolled
                               : conv_channel<0>(conv_w + c * K, bias, s, xin, K);
      }
    }
    for (int64_t q = 0; q < b; ++q)  // silu, a vector of channels at a time
      for (int64_t c = c0; c < c1; c += W) {
        const int cnt = static_cast<int>(std::min<int64_t>(W, c1 - c));
        const vfloat v = vload<float>(xs.data() + q * I + c, cnt);
        vstore_as<float>(xs.data() + q * I + c, v * vsigmoid(v), cnt);
      }
#pragma omp barrier
    // 3. x_proj
    if constexpr (ProjInput<P>::kPrepared) {
#pragma omp single
      in_xs.prepare(w_x, xs.data(), I, b);
    }
#pragma omp for schedule(static)
    for (int64_t r0 = 0; r0 < Pr; r0 += 4) proj_rows(w_x, in_xs, b, r0, std::min(Pr, r0 + 4), dbc.data(), Pr);
    // 4. dt_proj + softplus (vectorised over a block of W channels), SSM update, D, gate
#pragma omp for schedule(static)
    for (int64_t c0 = 0; c0 < I; c0 += W) {
      const int cnt = static_cast<int>(std::min<int64_t>(W, I - c0));
      float dts[kDotMaxRows * W];
      dot_rows(w_dt + c0 * R, dbc.data(), Pr, R, b, 0, cnt, dts, W);
      for (int64_t q = 0; q < b; ++q) {
        float dl[W], gate[W];
        vstore_as<float>(dl, vsoftplus(vload<float>(dts + q * W, cnt) + vload_as<float>(b_dt + c0, cnt)), cnt);
        const vfloat zv = vload<float>(xz.data() + q * 2 * I + I + c0, cnt);
        vstore_as<float>(gate, zv * vsigmoid(zv), cnt);
        const float* Bq = dbc.data() + q * Pr + R;
        const float* Cq = Bq + N;
        vfloat acc[W];
        for (int i = 0; i < cnt; ++i) {
          const int64_t c = c0 + i;
          const float xv = xs[q * I + c];
          float* s = ssm + (q * I + c) * N;
          acc[i] = vfloat{};
          for (int64_t k = 0; k < N; k += W) {
            const int kc = static_cast<int>(std::min<int64_t>(W, N - k));
            const vfloat a = vexp(dl[i] * vload<float>(A + c * N + k, kc));
            const vfloat sv = a * vload<float>(s + k, kc) + (dl[i] * xv) * vload<float>(Bq + k, kc);
            vstore_as<float>(s + k, sv, kc);
            acc[i] += sv * vload<float>(Cq + k, kc);
          }
        }
        float sums[W];
        hsums(acc, cnt, sums);
        for (int i = 0; i < cnt; ++i) {
          const int64_t c = c0 + i;
          const float xv = xs[q * I + c];
          y[q * I + c] = (sums[i] + (D ? D[c] * xv : 0.0f)) * gate[i];
        }
      }
    }
    // 5. out_proj (the loop above ends in a barrier)
    if constexpr (ProjInput<P>::kPrepared) {
#pragma omp single
      in_y.prepare(w_out, y.data(), I, b);
    }
#pragma omp for schedule(static)
    for (int64_t r0 = 0; r0 < H; r0 += kRowBlock)
      proj_rows(w_out, in_y, b, r0, std::min(H, r0 + kRowBlock), out, H);
  }
  if constexpr (!std::is_same_v<TH, float>)
    for (int64_t i = 0; i < b * H; ++i) out_h[i] = from_float<TH>(out[i]);
}

}  // namespace
}  // namespace bm

extern "C" {

int bm_mamba_step_max_rows() { return bm::kDotMaxRows; }

// h (b, H) and out (b, H) dtype_h (0 float32, 1 bfloat16; out is rounded to it); weights w_in (2I, H),
// conv_w (I, K), conv_b (I,) or null, w_x (R+2N, I), w_dt (I, R), b_dt (I,), w_out (H, I): dtype_w,
// contiguous; A (I, N) = -exp(A_log) and D (I,) or null float32; conv_state (b, I, K-1) dtype_s (dtype_w or 0); ssm (b, I, N)
// float32: both updated in place.
// quant: how w_in, w_x and w_out are stored: 0 plain (dtype_w; their scales null, group 0), 1 int8, 2 int4 (each
// q with its scales s_in, s_x, s_out, all three with the same group; formats as in bm_qgemv).
// Returns 0, 1 for a bad batch, 2 unsupported dtypes, 3 a bad quant code or group.
int bm_mamba_step(int dtype_h, int dtype_w, int dtype_s, const void* h, const void* w_in, const void* conv_w,
                  const void* conv_b, const void* w_x, const void* w_dt, const void* b_dt, const float* A,
                  const float* D, const void* w_out, void* conv_state, float* ssm, void* out, int64_t b, int64_t H,
                  int64_t I, int64_t N, int64_t R, int64_t K, int threads, int quant, const void* s_in,
                  const void* s_x, const void* s_out, int64_t group) {
  using namespace bm;
  if (b > kDotMaxRows || b < 1) return 1;
  if (quant < 0 || quant > 2) return 3;
  const StepShape sh{b, H, I, N, R, K};
  bool ok = true;
  auto run = [&]<typename TH, typename TW, typename TS>() {
    ok = with_proj<TW>(quant, group, [&](auto make) {
      mamba_step<TH, TW, TS>(sh, static_cast<const TH*>(h), make(w_in, s_in, H), static_cast<const TW*>(conv_w),
                             static_cast<const TW*>(conv_b), make(w_x, s_x, I), static_cast<const TW*>(w_dt),
                             static_cast<const TW*>(b_dt), A, D, make(w_out, s_out, I),
                             static_cast<TS*>(conv_state), ssm, static_cast<TH*>(out), threads);
    });
  };
  // the conv state: the weights' dtype, or float32 (a state kept in float32 with bfloat16 weights)
  if (dtype_s != dtype_w && dtype_s != 0) return 2;
  if (dtype_h == 0 && dtype_w == 0) run.template operator()<float, float, float>();
  else if (dtype_h == 0 && dtype_w == 1 && dtype_s == 1) run.template operator()<float, bf16, bf16>();
  else if (dtype_h == 0 && dtype_w == 1 && dtype_s == 0) run.template operator()<float, bf16, float>();
  else if (dtype_h == 1 && dtype_w == 0) run.template operator()<bf16, float, float>();
  else if (dtype_h == 1 && dtype_w == 1 && dtype_s == 1) run.template operator()<bf16, bf16, bf16>();
  else if (dtype_h == 1 && dtype_w == 1 && dtype_s == 0) run.template operator()<bf16, bf16, float>();
  else return 2;
  return ok ? 0 : 3;
}

}  // extern "C"
