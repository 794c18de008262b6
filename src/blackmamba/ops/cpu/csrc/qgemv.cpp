// y = x W^T (+ bias) for a few rows of x with W stored quantized (ops/quant.py: int8 with a float32 scale a row,
// or int4 two a byte with a float16 scale a group): the decode-time linear layer, reading W once, a quarter or an
// eighth of float32's bytes. The values are read as stored (dot.h's Int8Rows / Int4Rows views) and multiplied by
// x quantized per group as the product defines it (int8 weights: x as int16; int4: x as int8), as exact integer
// multiply-adds on AVX2 (each group's sum then scaled in float32), in float32 elsewhere; x (r, i) and y (r, o)
// float32. Parallel over blocks of output rows.
#include "dot.h"

#include <algorithm>
#include <vector>

namespace bm {
namespace {

constexpr int64_t kRowsPerTask = 64;

template <typename View>
void qgemv(const View& w, const float* x, const float* bias, float* y, int64_t r, int64_t o, int threads) {
  std::vector<float> prepared;
  const float* xs = x;
  int64_t stride = w.len;
  if constexpr (View::kPrepared) {
    prepared.resize(r * w.xlen());
    w.prepare_x(x, w.len, r, prepared.data());
    xs = prepared.data();
    stride = w.xlen();
  }
  const int64_t tasks = (o + kRowsPerTask - 1) / kRowsPerTask;
  parallel_for(tasks, threads, [&](int64_t task) {
    const int64_t r0 = task * kRowsPerTask, r1 = std::min(o, r0 + kRowsPerTask);
    dot_rows(w, xs, stride, r, r0, r1, y, o);
    if (bias)
      for (int64_t q = 0; q < r; ++q)
        for (int64_t row = r0; row < r1; ++row) y[q * o + row] += bias[row];
  });
}

}  // namespace
}  // namespace bm

extern "C" {

// mode 0: int8, q int8 (o, i), scales float32 (o,), group 0; mode 1: int4, q uint8 (o, ceil(i / 2)), scales
// float16 (o, ceil(i / group)), group even >= 2. x (r, i), y (r, o) float32 contiguous; bias (o,) float32 or null;
// 1 <= r <= bm_gemv_max_rows(). Returns 0, or 1 for too many rows, 2 an unknown mode, 3 a bad group or shape.
int bm_qgemv(int mode, const float* x, const void* q, const void* scales, const float* bias, float* y, int64_t r,
             int64_t i, int64_t o, int64_t group, int threads) {
  using namespace bm;
  if (r < 1 || r > kDotMaxRows) return 1;
  if (i < 1 || o < 0) return 3;
  if (mode == 0) {
    if (group != 0) return 3;
    qgemv(Int8Rows{static_cast<const int8_t*>(q), static_cast<const float*>(scales), i}, x, bias, y, r, o, threads);
  } else if (mode == 1) {
    if (group < 2 || group % 2) return 3;
    qgemv(Int4Rows{static_cast<const uint8_t*>(q), static_cast<const uint16_t*>(scales), i, group}, x, bias, y, r, o,
          threads);
  } else {
    return 2;
  }
  return 0;
}

}  // extern "C"
