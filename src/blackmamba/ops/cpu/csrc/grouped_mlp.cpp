// The experts' gated MLPs with one expert per thread (op moe_experts' cpu backend, see ops/cpu/grouped_mlp.py):
//   forward   h_e = x_e @ fc1_e.T;  g_e = act(a_e) * b_e with [a_e | b_e] = h_e;  y_e = g_e @ fc2_e.T
//   backward  dg = dy_e @ fc2_e;  da = dg * b * act'(a), db = dg * act(a);  g = act(a) * b (recomputed);
//             dfc2_e = dy_e.T @ g;  dfc1_e = [da | db].T @ x_e;  dx_e = [da | db] @ fc1_e
// x, y, dy, dx: (T, H) rows grouped by expert (counts[e] rows for expert e, in expert order); fc1_e (2F, H),
// fc2_e (H, F), h_e (counts[e], 2F): all float32, contiguous.
//
// Each thread takes whole experts, largest first, and runs their matmuls single-threaded (BLAS sgemm called
// inside an OpenMP parallel region runs on the calling thread), the activation fused in between on rows
// still in cache. Against one multi-threaded batched GEMM per matmul this keeps an expert's
// intermediates (a few MB) in cache from one matmul to the next and lets one thread pack its expert's
// weights while the other computes. The caller checks that the experts' rows share out evenly.
//
// sgemm: the address of a Fortran-ABI sgemm_ with 32-bit integers (PyTorch's MKL), passed in by the caller.
#include "act.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <numeric>
#include <vector>

namespace bm {
namespace {

using Sgemm = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                       const int*, const float*, const int*, const float*, float*, const int*);

// row-major c (m, n) = op(a) @ op(b) with op(a) (m, k), op(b) (k, n); ld*: row strides. BLAS is column-major:
// there it is c.T (n, m) = op(b).T @ op(a).T.
struct Gemm {
  Sgemm f;
  void operator()(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                  int64_t ldb, float* c, int64_t ldc) const {
    const char opa = ta ? 'T' : 'N', opb = tb ? 'T' : 'N';
    const float one = 1.0f, zero = 0.0f;
    const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    f(&opb, &opa, &M, &N, &K, &one, b, &la, a, &lb, &zero, c, &lc);
  }
};


// dgg (m, F): dg in, act(a) * b out; dh (m, 2F) = [dg * b * act'(a) | dg * act(a)]
template <int A> void gate_backward_rows(const float* h, int64_t ldh, float* dgg, float* dh, int64_t m, int64_t F) {
  constexpr int L = lanes<float>;
  for (int64_t r = 0; r < m; ++r) {
    const float* a = h + r * ldh;
    float* gr = dgg + r * F;
    float* dr = dh + r * 2 * F;
    for (int64_t k = 0; k < F; k += L) {
      const int cnt = static_cast<int>(std::min<int64_t>(L, F - k));
      vfloat y, dy;
      activation<A>(vload<float>(a + k, cnt), y, dy);
      const vfloat b = vload<float>(a + F + k, cnt), d = vload<float>(gr + k, cnt);
      vstore_as<float>(dr + k, d * b * dy, cnt);
      vstore_as<float>(dr + F + k, d * y, cnt);
      vstore_as<float>(gr + k, y * b, cnt);
    }
  }
}

// The experts in decreasing row count with their first rows: the order threads take them in.
struct Plan {
  std::vector<int64_t> first, order;
  int64_t most = 0;
  Plan(int64_t E, const int64_t* counts) : first(E + 1, 0), order(E) {
    for (int64_t e = 0; e < E; ++e) first[e + 1] = first[e] + counts[e];
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t p, int64_t q) { return counts[p] > counts[q]; });
    most = E ? counts[order[0]] : 0;
  }
};

// Run body(e, scratch) for every expert with rows, each on one thread with its own scratch of `floats`
// floats; false if a scratch allocation failed (nothing is then complete).
template <typename Body>
bool for_each_expert(const Plan& plan, const int64_t* counts, int64_t floats, int threads, const Body& body) {
  std::atomic<bool> ok{true};
  const int64_t E = static_cast<int64_t>(plan.order.size());
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    float* scratch = static_cast<float*>(std::aligned_alloc(64, ((std::max<int64_t>(floats, 1) * 4 + 63) / 64) * 64));
    if (!scratch) ok = false;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < E; ++i) {
      const int64_t e = plan.order[i];
      if (counts[e] > 0 && scratch && ok) body(e, scratch);
    }
    std::free(scratch);
  }
  return ok;
}

template <int A>
bool forward(Gemm gemm, int64_t E, const int64_t* counts, int64_t H, int64_t F, const float* x,
             const float* const* fc1, const float* const* fc2, float* const* h, float* y, int threads) {
  const Plan plan(E, counts);
  // scratch: g (m, F) when h is kept, else h itself (m, 2F) with g written over a
  return for_each_expert(plan, counts, plan.most * (h ? F : 2 * F), threads, [&](int64_t e, float* scratch) {
    const int64_t m = counts[e], row = plan.first[e];
    float* he = h ? h[e] : scratch;
    gemm(false, true, m, 2 * F, H, x + row * H, H, fc1[e], H, he, 2 * F);
    float* g = h ? scratch : he;
    const int64_t ldg = h ? F : 2 * F;
    gate_rows<A>(he, 2 * F, g, ldg, m, F);
    gemm(false, true, m, H, F, g, ldg, fc2[e], F, y + row * H, H);
  });
}

template <int A>
bool backward(Gemm gemm, int64_t E, const int64_t* counts, int64_t H, int64_t F, const float* x, const float* dy,
              const float* const* fc1, const float* const* fc2, const float* const* h, float* const* dfc1,
              float* const* dfc2, float* dx, int threads) {
  const Plan plan(E, counts);
  // scratch: dg, then g (m, F); dh (m, 2F)
  return for_each_expert(plan, counts, plan.most * 3 * F, threads, [&](int64_t e, float* scratch) {
    const int64_t m = counts[e], row = plan.first[e];
    const float* dye = dy + row * H;
    float* dgg = scratch;
    float* dh = scratch + m * F;
    gemm(false, false, m, F, H, dye, H, fc2[e], F, dgg, F);
    gate_backward_rows<A>(h[e], 2 * F, dgg, dh, m, F);
    if (dfc2 && dfc2[e]) gemm(true, false, H, F, m, dye, H, dgg, F, dfc2[e], F);
    if (dfc1 && dfc1[e]) gemm(true, false, 2 * F, H, m, dh, 2 * F, x + row * H, H, dfc1[e], H);
    if (dx) gemm(false, false, m, H, 2 * F, dh, 2 * F, fc1[e], H, dx + row * H, H);
  });
}

}  // namespace
}  // namespace bm

extern "C" {

// h: E pointers to (counts[e], 2F) blocks to keep for the backward, or null (inference). 0 on success, 1 if
// scratch memory could not be allocated, 2 for an unknown activation code.
int bm_grouped_mlp_forward(const void* sgemm, int activation, int64_t E, const int64_t* counts, int64_t H, int64_t F,
                           const float* x, const float* const* fc1, const float* const* fc2, float* const* h, float* y,
                           int threads) {
  using namespace bm;
  const Gemm gemm{reinterpret_cast<Sgemm>(const_cast<void*>(sgemm))};
  if (activation == kSilu) return forward<kSilu>(gemm, E, counts, H, F, x, fc1, fc2, h, y, threads) ? 0 : 1;
  if (activation == kGelu) return forward<kGelu>(gemm, E, counts, H, F, x, fc1, fc2, h, y, threads) ? 0 : 1;
  return 2;
}

// h: the forward's blocks. dfc1, dfc2: E pointers each (an entry null: that gradient is not wanted), or null;
// dx: (T, H) or null. Return codes as the forward's.
int bm_grouped_mlp_backward(const void* sgemm, int activation, int64_t E, const int64_t* counts, int64_t H, int64_t F,
                            const float* x, const float* dy, const float* const* fc1, const float* const* fc2,
                            const float* const* h, float* const* dfc1, float* const* dfc2, float* dx, int threads) {
  using namespace bm;
  const Gemm gemm{reinterpret_cast<Sgemm>(const_cast<void*>(sgemm))};
  if (activation == kSilu)
    return backward<kSilu>(gemm, E, counts, H, F, x, dy, fc1, fc2, h, dfc1, dfc2, dx, threads) ? 0 : 1;
  if (activation == kGelu)
    return backward<kGelu>(gemm, E, counts, H, F, x, dy, fc1, fc2, h, dfc1, dfc2, dx, threads) ? 0 : 1;
  return 2;
}

}  // extern "C"
