// The scan kernels' vectorised float exp, exposed elementwise so the tests can check its accuracy.
#include "simd.h"

#include <algorithm>

extern "C" void bm_exp(const float* x, float* out, int64_t count, int threads) {
  using namespace bm;
  constexpr int W = lanes<float>;
  constexpr int64_t grain = 4096;
  parallel_for((count + grain - 1) / grain, threads, [&](int64_t chunk) {
    const int64_t i1 = std::min(count, (chunk + 1) * grain);
    for (int64_t i = chunk * grain; i < i1; i += W) {
      const int cnt = static_cast<int>(std::min<int64_t>(W, i1 - i));
      vstore_as<float>(out + i, vexp(vload<float>(x + i, cnt)), cnt);
    }
  });
}
