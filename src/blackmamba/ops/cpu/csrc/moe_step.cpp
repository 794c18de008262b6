// One decode step of a top-1 MoE layer for a few tokens, in one call (op moe_step's cpu backend, ops/cpu/decode.py):
//   logits = x R^T + r;  gate, e = max, argmax of sigmoid(logits)           (the released inference routing)
//   y = gate * (act(a) * b) fc2_e^T,  [a | b] = x fc1_e^T                      (the chosen expert's gated MLP)
// Tokens that chose the same expert share one pass over its weights: decode is limited by reading them, and a
// token reads only its own expert's. x and out (b, H): float32 or bfloat16 (TH); R (E, H), r (E,) or null,
// fc1_e (2F, H), fc2_e (H, F): float32 or bfloat16 (TW), contiguous, or the experts' weights int8 / int4 (P: dot.h's
// PlainRows<TW>, Int8Rows or Int4Rows, summed as bm_gemv / bm_qgemv sum them). Accumulation and activations in
// float32.
#include "act.h"
#include "dot.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include <omp.h>

namespace bm {
namespace {

constexpr int64_t kRowBlock = 16;  // weight rows per OpenMP work item

template <typename T> inline float round_to(float v) {  // v as a T holds it
  if constexpr (std::is_same_v<T, bf16>) {
    return to_float(to_bf16(v));
  } else {
    return v;
  }
}

// fc1(e), fc2(e): expert e's projections (P)
template <typename TH, typename TW, int A, typename Fc1, typename Fc2>
void moe_step(const TH* x_in, const TW* router_w, const TW* router_b, const Fc1& fc1, const Fc2& fc2, TH* out,
              int64_t b, int64_t H, int64_t F, int64_t E, int threads) {
  using P = decltype(fc1(0));
  std::vector<float> x(b * H), logits(b * E), gate(b), xg(b * H), hg(b * 2 * F), yg(b * H);
  std::vector<int64_t> expert(b);
  for (int64_t i = 0; i < b * H; ++i) x[i] = to_float(x_in[i]);
  dot_rows(router_w, x.data(), H, H, b, 0, E, logits.data(), E);  // E rows: too few to share out
  for (int64_t q = 0; q < b; ++q) {
    // the expert is the first maximum of sigmoid(logits) as the model's dtype holds them (torch's max): where the
    // sigmoid saturates, equal probabilities are ties that go to the lower index, not to the larger logit
    const float* l = logits.data() + q * E;
    float best = -1.0f;
    for (int64_t e = 0; e < E; ++e) {
      const float v = round_to<TH>(l[e] + (router_b ? to_float(router_b[e]) : 0.0f));
      const float p = round_to<TH>(1.0f / (1.0f + std::exp(-v)));
      if (p > best) best = p, expert[q] = e;
    }
    gate[q] = best;
  }
  std::vector<int64_t> order(b);
  for (int64_t q = 0; q < b; ++q) order[q] = q;
  std::stable_sort(order.begin(), order.end(), [&](int64_t p, int64_t q) { return expert[p] < expert[q]; });
  ProjInput<P> in1, in2;  // fc1's and fc2's inputs (quantized: prepared by the single threads that write them)
  if constexpr (!ProjInput<P>::kPrepared) {  // read where they are
    in1.prepare(fc1(0), xg.data(), H, b);
    in2.prepare(fc2(0), hg.data(), 2 * F, b);
  }
#pragma omp parallel num_threads(threads)
  for (int64_t g0 = 0; g0 < b;) {  // every thread walks the same groups of tokens sharing an expert
    int64_t g1 = g0;
    while (g1 < b && expert[order[g1]] == expert[order[g0]]) ++g1;
    const int64_t n = g1 - g0, e = expert[order[g0]];
    const P w1 = fc1(e), w2 = fc2(e);
#pragma omp single
    {
      for (int64_t j = 0; j < n; ++j) std::copy_n(x.data() + order[g0 + j] * H, H, xg.data() + j * H);
      if constexpr (ProjInput<P>::kPrepared) in1.prepare(w1, xg.data(), H, n);
    }
#pragma omp for schedule(static)
    for (int64_t r0 = 0; r0 < 2 * F; r0 += kRowBlock)
      proj_rows(w1, in1, n, r0, std::min(2 * F, r0 + kRowBlock), hg.data(), 2 * F);
#pragma omp single
    {
      gate_rows<A>(hg.data(), 2 * F, hg.data(), 2 * F, n, F);  // g = act(a) * b, in place of a
      if constexpr (ProjInput<P>::kPrepared) in2.prepare(w2, hg.data(), 2 * F, n);
    }
#pragma omp for schedule(static)
    for (int64_t r0 = 0; r0 < H; r0 += kRowBlock)
      proj_rows(w2, in2, n, r0, std::min(H, r0 + kRowBlock), yg.data(), H);
#pragma omp single
    for (int64_t j = 0; j < n; ++j) {
      const int64_t q = order[g0 + j];
      for (int64_t k = 0; k < H; ++k) {
        const float v = gate[q] * yg[j * H + k];
        if constexpr (std::is_same_v<TH, bf16>) out[q * H + k] = to_bf16(v); else out[q * H + k] = v;
      }
    }
    g0 = g1;
  }
}

}  // namespace
}  // namespace bm

extern "C" {

// dtype_h: x and out (b, H); dtype_w: router_w (E, H), router_b (E,) or null, and the E experts' fc1 (2F, H) and
// fc2 (H, F) weights, given as arrays of E pointers. Dtype codes 0 float32, 1 bfloat16; activation 0 silu, 1 gelu.
// b <= kDotMaxRows. quant: how the experts' weights are stored: 0 plain (dtype_w; fc1_s, fc2_s null, group 0),
// 1 int8, 2 int4: fc1 and fc2 then the experts' q and fc1_s, fc2_s their scales (arrays of E pointers), all with
// the same group; formats as in bm_qgemv. 0 on success, 1 bad arguments, 3 a bad quant code or group.
int bm_moe_step(int dtype_h, int dtype_w, int activation, const void* x, const void* router_w, const void* router_b,
                const void* const* fc1, const void* const* fc2, void* out, int64_t b, int64_t H, int64_t F, int64_t E,
                int threads, int quant, const void* const* fc1_s, const void* const* fc2_s, int64_t group) {
  using namespace bm;
  if (b < 1 || b > kDotMaxRows || (dtype_h != 0 && dtype_h != 1) || (dtype_w != 0 && dtype_w != 1) ||
      (activation != kSilu && activation != kGelu))
    return 1;
  if (quant < 0 || quant > 2) return 3;
  bool ok = true;
  auto run = [&]<typename TH, typename TW>() {
    ok = with_proj<TW>(quant, group, [&](auto make) {
      auto f1 = [&](int64_t e) { return make(fc1[e], fc1_s ? fc1_s[e] : nullptr, H); };
      auto f2 = [&](int64_t e) { return make(fc2[e], fc2_s ? fc2_s[e] : nullptr, F); };
      if (activation == kSilu)
        moe_step<TH, TW, kSilu>(static_cast<const TH*>(x), static_cast<const TW*>(router_w),
                                static_cast<const TW*>(router_b), f1, f2, static_cast<TH*>(out), b, H, F, E, threads);
      else
        moe_step<TH, TW, kGelu>(static_cast<const TH*>(x), static_cast<const TW*>(router_w),
                                static_cast<const TW*>(router_b), f1, f2, static_cast<TH*>(out), b, H, F, E, threads);
    });
  };
  if (dtype_h == 0 && dtype_w == 0) run.template operator()<float, float>();
  if (dtype_h == 0 && dtype_w == 1) run.template operator()<float, bf16>();
  if (dtype_h == 1 && dtype_w == 0) run.template operator()<bf16, float>();
  if (dtype_h == 1 && dtype_w == 1) run.template operator()<bf16, bf16>();
  return ok ? 0 : 3;
}

}  // extern "C"
