// A recorded run of the decode kernels, replayed in one call (ops/cpu/replay.py): a batch-1 token is some fifty
// kernel calls, and the Python between them costs more than a tenth of the token; a replay makes the same calls
// with the same arguments, in order, without it.
//
// Each entry is a kernel code and that kernel's arguments in its parameter order, each in one int64 slot:
// pointers and integers as themselves, a float as its 32-bit pattern (the low half of the slot).
#include <cstdint>
#include <cstring>

extern "C" {
int bm_add_rmsnorm(int dtype_h, int dtype_r, int dtype_w, const void* h, const void* residual, const void* weight,
                   void* out, void* res_out, int64_t rows, int64_t H, float eps, int threads);
int bm_mamba_step(int dtype_h, int dtype_w, int dtype_s, const void* h, const void* w_in, const void* conv_w,
                  const void* conv_b, const void* w_x, const void* w_dt, const void* b_dt, const float* A,
                  const float* D, const void* w_out, void* conv_state, float* ssm, void* out, int64_t b, int64_t H,
                  int64_t I, int64_t N, int64_t R, int64_t K, int threads, int quant, const void* s_in,
                  const void* s_x, const void* s_out, int64_t group);
int bm_moe_step(int dtype_h, int dtype_w, int activation, const void* x, const void* router_w, const void* router_b,
                const void* const* fc1, const void* const* fc2, void* out, int64_t b, int64_t H, int64_t F, int64_t E,
                int threads, int quant, const void* const* fc1_s, const void* const* fc2_s, int64_t group);
}

namespace {

constexpr int kReplayArgs = 28;  // the most any replayable kernel takes (bm_mamba_step)

// kernel codes: ops/cpu/replay.py REPLAY_CODE
enum Kernel : int64_t { kAddRmsnorm = 0, kMambaStep = 1, kMoeStep = 2 };

struct ReplayCall {
  int64_t kernel;
  int64_t a[kReplayArgs];
};

struct Args {
  const int64_t* a;
  int i(int k) const { return static_cast<int>(a[k]); }
  int64_t l(int k) const { return a[k]; }
  template <typename T = void> T* p(int k) const { return reinterpret_cast<T*>(static_cast<intptr_t>(a[k])); }
  float f(int k) const {
    const uint32_t bits = static_cast<uint32_t>(a[k]);
    float v;
    std::memcpy(&v, &bits, sizeof v);
    return v;
  }
};

int run(const ReplayCall& c) {
  const Args x{c.a};
  switch (c.kernel) {
    case kAddRmsnorm:
      return bm_add_rmsnorm(x.i(0), x.i(1), x.i(2), x.p(3), x.p(4), x.p(5), x.p(6), x.p(7), x.l(8), x.l(9), x.f(10),
                            x.i(11));
    case kMambaStep:
      return bm_mamba_step(x.i(0), x.i(1), x.i(2), x.p(3), x.p(4), x.p(5), x.p(6), x.p(7), x.p(8), x.p(9),
                           x.p<const float>(10), x.p<const float>(11), x.p(12), x.p(13), x.p<float>(14), x.p(15),
                           x.l(16), x.l(17), x.l(18), x.l(19), x.l(20), x.l(21), x.i(22), x.i(23), x.p(24), x.p(25),
                           x.p(26), x.l(27));
    case kMoeStep:
      return bm_moe_step(x.i(0), x.i(1), x.i(2), x.p(3), x.p(4), x.p(5), x.p<const void* const>(6),
                         x.p<const void* const>(7), x.p(8), x.l(9), x.l(10), x.l(11), x.l(12), x.i(13), x.i(14),
                         x.p<const void* const>(15), x.p<const void* const>(16), x.l(17));
    default:
      return -1;
  }
}

}  // namespace

extern "C" {

int bm_replay_max_args() { return kReplayArgs; }

// Runs calls[0 .. n) in order; stops at the first that fails. Returns 0, or the failing kernel's return code
// (-1: an unknown kernel code) with its index in *failed.
int bm_replay(const void* calls, int64_t n, int64_t* failed) {
  const ReplayCall* c = static_cast<const ReplayCall*>(calls);
  for (int64_t k = 0; k < n; ++k) {
    const int rc = run(c[k]);
    if (rc) {
      *failed = k;
      return rc;
    }
  }
  return 0;
}

}  // extern "C"
