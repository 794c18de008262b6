// y = x W^T (+ bias) for a few rows of x: the decode-time linear layer, limited by reading W once.
// W (o, i) may be bfloat16 (half the bytes; converted to float32 in registers) or float32; x (r, i)
// and y (r, o) float32. Parallel over blocks of output rows.
#include "simd.h"

#include <algorithm>

namespace bm {
namespace {

constexpr int kMaxRows = 8;
constexpr int64_t kRowsPerTask = 64;

template <typename TW>
void gemv(const float* x, const TW* w, const float* bias, float* y, int64_t r, int64_t i, int64_t o, int threads) {
  constexpr int W = lanes<float>;
  const int64_t tasks = (o + kRowsPerTask - 1) / kRowsPerTask;
  parallel_for(tasks, threads, [&](int64_t task) {
    const int64_t o1 = std::min(o, (task + 1) * kRowsPerTask);
    for (int64_t row = task * kRowsPerTask; row < o1; ++row) {
      const TW* wr = w + row * i;
      vfloat acc[kMaxRows] = {};
      for (int64_t k = 0; k < i; k += W) {
        const int cnt = static_cast<int>(std::min<int64_t>(W, i - k));
        const vfloat wv = vload_as<float>(wr + k, cnt);
        for (int64_t q = 0; q < r; ++q) acc[q] += wv * vload<float>(x + q * i + k, cnt);
      }
      for (int64_t q = 0; q < r; ++q) {
        float s = bias ? bias[row] : 0.0f;
        for (int lane = 0; lane < W; ++lane) s += acc[q][lane];
        y[q * o + row] = s;
      }
    }
  });
}

}  // namespace
}  // namespace bm

extern "C" {

int bm_gemv_max_rows() { return bm::kMaxRows; }

// x (r, i), y (r, o) float32 contiguous; w (o, i) contiguous, dtype_w 0 float32 / 1 bfloat16;
// bias (o,) float32 or null; r <= bm_gemv_max_rows().
int bm_gemv(int dtype_w, const float* x, const void* w, const float* bias, float* y, int64_t r, int64_t i, int64_t o,
            int threads) {
  using namespace bm;
  if (r > kMaxRows) return 1;
  if (dtype_w == 0)
    gemv(x, static_cast<const float*>(w), bias, y, r, i, o, threads);
  else if (dtype_w == 1)
    gemv(x, static_cast<const bf16*>(w), bias, y, r, i, o, threads);
  else
    return 2;
  return 0;
}

}  // extern "C"
