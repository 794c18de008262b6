// y = x W^T (+ bias) for a few rows of x: the decode-time linear layer, limited by reading W once.
// W (o, i) may be bfloat16 (half the bytes; converted to float32 in registers) or float32; x (r, i)
// and y (r, o) float32. Parallel over blocks of output rows.
#include "dot.h"

#include <algorithm>

namespace bm {
namespace {

constexpr int64_t kRowsPerTask = 64;

template <typename TW>
void gemv(const float* x, const TW* w, const float* bias, float* y, int64_t r, int64_t i, int64_t o, int threads) {
  const int64_t tasks = (o + kRowsPerTask - 1) / kRowsPerTask;
  parallel_for(tasks, threads, [&](int64_t task) {
    const int64_t r0 = task * kRowsPerTask, r1 = std::min(o, r0 + kRowsPerTask);
    dot_rows(w, x, i, i, r, r0, r1, y, o);
    if (bias)
      for (int64_t q = 0; q < r; ++q)
        for (int64_t row = r0; row < r1; ++row) y[q * o + row] += bias[row];
  });
}

}  // namespace
}  // namespace bm

extern "C" {

int bm_gemv_max_rows() { return bm::kDotMaxRows; }

// x (r, i), y (r, o) float32 contiguous; w (o, i) contiguous, dtype_w 0 float32 / 1 bfloat16;
// bias (o,) float32 or null; r <= bm_gemv_max_rows().
int bm_gemv(int dtype_w, const float* x, const void* w, const float* bias, float* y, int64_t r, int64_t i, int64_t o,
            int threads) {
  using namespace bm;
  if (r > kDotMaxRows) return 1;
  if (dtype_w == 0)
    gemv(x, static_cast<const float*>(w), bias, y, r, i, o, threads);
  else if (dtype_w == 1)
    gemv(x, static_cast<const bf16*>(w), bias, y, r, i, o, threads);
  else
    return 2;
  return 0;
}

}  // extern "C"
