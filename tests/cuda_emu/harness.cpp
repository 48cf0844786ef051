// The CUDA kernels of csrc/cuda/*_kernels.cuh, with their launch logic, run on the host by the
// emulator of cuda_emu.h. Built by tests/test_cuda_emulated.py with g++ into a shared library
// that the test loads with ctypes; every entry point takes raw pointers (torch tensors' data)
// and returns 0, or 1 with the message in emu_last_error(). Not part of the package build.
#include "cuda_emu.h"  // first: the built-ins the kernel headers use

#include <exception>
#include <string>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

// FASTNOISE_EMU_ONLY=embedding / noisytune: one op's kernels (a quicker build, for the tests'
// mutated copies of one header)
#define FASTNOISE_EMU_embedding 1
#define FASTNOISE_EMU_noisytune 2
#if !defined(FASTNOISE_EMU_ONLY) || FASTNOISE_EMU_ONLY == FASTNOISE_EMU_embedding
#define FASTNOISE_EMU_WITH_EMBEDDING 1
#include "../../csrc/cuda/embedding_kernels.cuh"
#include "../../csrc/cuda/token_scale_kernels.cuh"
#endif
#if !defined(FASTNOISE_EMU_ONLY) || FASTNOISE_EMU_ONLY == FASTNOISE_EMU_noisytune
#define FASTNOISE_EMU_WITH_NOISYTUNE 1
#include "../../csrc/cuda/noisytune_kernels.cuh"
#endif

using namespace fastnoise;
using namespace fastnoise::cuda;

namespace {

std::string& last_error() {
  static std::string e;
  return e;
}

template <typename F>
int guarded(F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    last_error() = e.what();
    return 1;
  }
}

template <typename T>
struct Tag {
  using type = T;
};

// dtype codes of the tests (and of NoisyTune's table: DtypeCode)
enum Dtype : int64_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };
#if FASTNOISE_EMU_WITH_NOISYTUNE
static_assert(int64_t{kFloat32} == int64_t{kF32} && int64_t{kFloat16} == int64_t{kF16} &&
              int64_t{kBFloat16} == int64_t{kBF16} && int64_t{kFloat64} == int64_t{kF64});
#endif

// dtype code -> f(Tag<T>{}). FASTNOISE_EMU_MINIMAL: float32 weights and int64 ids only (a
// quicker build, for the tests' mutated copies of the kernels).
template <typename F>
void dispatch_float(int64_t code, F&& f) {
#if defined(FASTNOISE_EMU_MINIMAL)
  if (code != kFloat32) throw std::runtime_error("harness: minimal build: float32 only");
  f(Tag<float>{});
#else
  switch (code) {
    case kFloat32: f(Tag<float>{}); break;
    case kFloat16: f(Tag<c10::Half>{}); break;
    case kBFloat16: f(Tag<c10::BFloat16>{}); break;
    case kFloat64: f(Tag<double>{}); break;
    default: throw std::runtime_error("harness: bad dtype code");
  }
#endif
}

template <typename F>
void dispatch_index(int ids_int32, F&& f) {
#if defined(FASTNOISE_EMU_MINIMAL)
  if (ids_int32) throw std::runtime_error("harness: minimal build: int64 ids only");
  f(Tag<int64_t>{});
#else
  if (ids_int32) f(Tag<int32_t>{}); else f(Tag<int64_t>{});
#endif
}

}  // namespace

extern "C" {

const char* emu_last_error() { return last_error().c_str(); }

// order: 0 forward, 1 reverse, 2 seeded random (blocks and threads); sms: the SM count the
// launch logic sees (it caps grids at 32 blocks an SM).
void emu_configure(int order, uint64_t seed, int sms) {
  fastnoise_emu::config().order = static_cast<fastnoise_emu::Order>(order);
  fastnoise_emu::config().seed = seed;
  fastnoise_emu::config().sms = sms;
}

#if FASTNOISE_EMU_WITH_EMBEDDING
// seed_ptr / offset_ptr / offset_add / xor_mask: SeedArg's device-read seed (a seed_tensor,
// or the CUDA generator's Philox state under graph capture).
int emu_embedding_forward(int ids_int32, const void* ids, int64_t n, int64_t dtype,
                          const void* weight, int64_t w_stride, int64_t V, void* out,
                          int64_t d, int64_t kind, float mag, const float* tok_mag,
                          uint64_t seed, uint64_t offset, const int64_t* seed_ptr,
                          const int64_t* offset_ptr, uint64_t offset_add, uint64_t xor_mask,
                          int symmetric, double embed_scale, int64_t* error) {
  return guarded([&] {
    if (n == 0 || d == 0) return;
    dispatch_index(ids_int32, [&](auto it) {
      using I = typename decltype(it)::type;
      dispatch_float(dtype, [&](auto ft) {
        using T = typename decltype(ft)::type;
        auto launch = embed_scale != 1.0 ? launch_forward<T, I, true>
                                         : launch_forward<T, I, false>;
        SeedArg sa;
        sa.seed = seed;
        sa.offset = offset;
        sa.seed_ptr = seed_ptr;
        sa.offset_ptr = offset_ptr;
        sa.offset_add = offset_add;
        sa.xor_mask = xor_mask;
        launch(static_cast<const I*>(ids), n, static_cast<const T*>(weight), w_stride, V,
               static_cast<T*>(out), d, kind, mag, tok_mag, sa, symmetric != 0, embed_scale,
               error, nullptr, fastnoise_emu::config().sms);
      });
    });
  });
}

// The per-token scale (token_scale_kernels.cuh). *_bytes: IntRef's element codes (1 bool or
// uint8, -1 int8, 2, 4, 8); a null pointer: the input is absent.
int emu_token_scale(int64_t n, int64_t row, int64_t d, double alpha, const void* mask,
                    int mask_bytes, const void* positions, int positions_bytes, const void* cu,
                    int cu_bytes, int64_t cu_len, float* mag, int32_t* scratch, int64_t* error) {
  return guarded([&] {
    if (n == 0) return;
    TokenScaleArgs a;
    a.n = n;
    a.row = row;
    a.d = d;
    a.alpha = alpha;
    a.mask = IntRef{mask, mask_bytes};
    a.positions = IntRef{positions, positions_bytes};
    a.cu = IntRef{cu, cu_bytes};
    a.cu_len = cu_len;
    a.mag = mag;
    a.scratch = scratch;
    a.error = error;
    launch_token_scale(a, nullptr, fastnoise_emu::config().sms);
  });
}

// Whether the forward's launch logic takes the 16-byte path for these rows.
int emu_plan_forward_vec(int64_t kind, int64_t V, int64_t d, int64_t w_stride,
                         int64_t elem_bytes, const void* weight, const void* out) {
  (void)V;
  return plan_forward(kind, 1, d, w_stride, elem_bytes, weight, out, 1).vec ? 1 : 0;
}

// The backward's plan (as embedding.cu takes it): out[0] = 1 for the sorted path, out[1] =
// the rows of its partial buffer.
void emu_plan_backward(int64_t elem_bytes, int deterministic, int64_t n, int64_t* out) {
  const BackwardPlan p = plan_backward(elem_bytes, deterministic != 0, n);
  out[0] = p.sorted ? 1 : 0;
  out[1] = p.partial_rows;
}

int emu_backward_sorted(int64_t dtype, const void* g, const int64_t* sorted,
                        const int64_t* perm, int64_t n, int64_t d, int64_t V, int64_t padding,
                        int symmetric, double embed_scale, void* grad, void* partial) {
  return guarded([&] {
    if (n == 0 || d == 0 || V == 0) return;
    dispatch_float(dtype, [&](auto ft) {
      using T = typename decltype(ft)::type;
      using A = typename AddType<T>::type;
      launch_backward_sorted<T>(static_cast<const T*>(g), sorted, perm, n, d, V, padding,
                                symmetric != 0, embed_scale, static_cast<T*>(grad),
                                static_cast<A*>(partial), nullptr);
    });
  });
}

// float32 / float64 grads only (atomics straight into the result, as embedding.cu).
int emu_backward_atomic(int64_t dtype, int ids_int32, const void* g, const void* ids, int64_t n,
                        int64_t d, int64_t V, int64_t padding, int symmetric,
                        double embed_scale, void* grad) {
  return guarded([&] {
    if (n == 0 || d == 0 || V == 0) return;
    dispatch_index(ids_int32, [&](auto it) {
      using I = typename decltype(it)::type;
      dispatch_float(dtype, [&](auto ft) {
        using T = typename decltype(ft)::type;
        if constexpr (sizeof(T) == 2) {
          throw std::runtime_error("harness: the atomic backward takes float32/float64 only");
        } else {
          launch_backward_atomic<T, I>(static_cast<const T*>(g), static_cast<const I*>(ids),
                                       n, d, V, padding, symmetric != 0, embed_scale,
                                       static_cast<T*>(grad), nullptr,
                                       fastnoise_emu::config().sms);
        }
      });
    });
  });
}

#endif  // FASTNOISE_EMU_WITH_EMBEDDING

#if FASTNOISE_EMU_WITH_NOISYTUNE
// stds: nullptr or one per tensor. stat_budget: the stats kernel's block budget (the op's is
// kStatBlockBudget; tests pass less to get many stats blocks on small tensors). plan_out
// (optional, 2 values): the stats and perturbation block counts of the plan.
int emu_noisytune(int64_t count, void* const* ptrs, const int64_t* numels,
                  const int64_t* starts, const int64_t* dtypes, double lam, uint64_t seed,
                  const double* stds, int64_t stat_budget, int64_t* plan_out) {
  return guarded([&] {
    std::vector<NoisyTuneTensor> descs;
    for (int64_t i = 0; i < count; ++i) {
      descs.push_back(NoisyTuneTensor{ptrs[i], numels[i], starts[i], dtypes[i]});
    }
    if (stat_budget <= 0) stat_budget = kStatBlockBudget;
    const NoisyTunePlan plan = plan_noisytune(descs, lam, stds, stat_budget);
    if (plan_out != nullptr) {
      plan_out[0] = plan.stat_blocks;
      plan_out[1] = plan.pert_blocks;
    }
    std::vector<int64_t> table = plan.table;  // "on the device"
    std::vector<double> partials(static_cast<size_t>(std::max<int64_t>(1, 3 * plan.stat_blocks)),
                                 std::numeric_limits<double>::quiet_NaN());
    launch_noisytune(plan, table.data(), partials.data(), lam, seed, nullptr);
  });
}

#endif  // FASTNOISE_EMU_WITH_NOISYTUNE

}  // extern "C"
