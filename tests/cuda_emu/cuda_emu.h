// The CUDA built-ins fastnoise's kernels use, implemented on the host, so that the real kernel
// text (csrc/cuda/*_kernels.cuh) runs on the CPU in CI (tests/test_cuda_emulated.py).
//
// Each thread of a block is a cooperative fiber (ucontext). Fibers run one at a time and switch
// only at __syncthreads, __syncwarp and the warp collectives (shuffles, votes), so atomics are
// atomic and there are no data races in the emulator itself. A launch runs its blocks one after
// another, in the order the test asks for (forward, reverse or seeded random), and at every
// scheduling pass the block's runnable threads in that same order: a missing barrier lets one
// thread run ahead of the others and read what they have not written yet (or overwrite what they
// have not read), and the result is wrong.
//
// Not modelled: concurrency between blocks (blocks run in turn: a kernel whose blocks wait for
// each other would deadlock here), memory-model reorderings (fences are no-ops), the exact
// numerics of the device's transcendental functions (sinf/cosf/logf are the host's).
#pragma once

#define FASTNOISE_CUDA_EMU 1

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define FASTNOISE_EMU_ASAN 1
#else
#define FASTNOISE_EMU_ASAN 0
#endif

// ---- qualifiers -------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
// one block runs at a time on one OS thread: a function-local static is the block's memory
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

// ---- vector types -----------------------------------------------------------------------
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)
      : x(x_), y(y_), z(z_) {}
};
struct __attribute__((aligned(8))) uint2 { unsigned int x, y; };
struct __attribute__((aligned(16))) uint4 { unsigned int x, y, z, w; };
struct __attribute__((aligned(16))) int4 { int x, y, z, w; };
struct __attribute__((aligned(8))) float2 { float x, y; };
struct __attribute__((aligned(16))) float4 { float x, y, z, w; };
struct __attribute__((aligned(16))) double2 { double x, y; };
inline uint2 make_uint2(unsigned int x, unsigned int y) { return {x, y}; }
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) {
  return {x, y, z, w};
}
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline double2 make_double2(double x, double y) { return {x, y}; }

using cudaStream_t = void*;

// ---- thread / block indices (set by the scheduler before it resumes a thread) ------------
inline uint3 threadIdx{0, 0, 0};
inline uint3 blockIdx{0, 0, 0};
inline dim3 blockDim{1, 1, 1};
inline dim3 gridDim{1, 1, 1};
constexpr int warpSize = 32;

// ---- math: the device names of the host's functions ---------------------------------------
using std::fmax;
using std::fmin;
using std::isfinite;
using std::isinf;
using std::isnan;
using std::sqrt;

namespace fastnoise_emu {

template <typename To, typename From>
inline To bits(From v) {
  static_assert(sizeof(To) == sizeof(From));
  To r;
  std::memcpy(&r, &v, sizeof(r));
  return r;
}

// ---- the scheduler ----------------------------------------------------------------------
enum class Order { kForward = 0, kReverse = 1, kRandom = 2 };

struct Config {
  Order order = Order::kForward;
  uint64_t seed = 0;
  int sms = 2;  // what the launch logic is told the SM count is
};
inline Config& config() {
  static Config c;
  return c;
}

enum class State { kRunnable, kBlockBarrier, kWarpBarrier, kDone };

struct Fiber {
  ucontext_t ctx;
  State state = State::kRunnable;
  unsigned int warp_mask = 0;  // lanes a kWarpBarrier waits for
  int phase = 0;               // which of the two exchange slots the next collective uses
  uint3 tid{0, 0, 0};
  void* fake_stack = nullptr;  // AddressSanitizer's fake stack of this fiber
};

class Block {
 public:
  static constexpr size_t kStackBytes = 64u << 10;  // ASan clears a stack's shadow per switch

  Block(dim3 block, std::function<void()> body) : body_(std::move(body)), dim_(block) {
    const size_t n = static_cast<size_t>(block.x) * block.y * block.z;
    if (n == 0 || n > 1024) throw std::runtime_error("cuda_emu: bad block size");
    fibers_.resize(n);
    stacks_ = stack_arena(n * kStackBytes);
    slots_.assign(((n + 31) / 32) * 32 * 2, 0);
  }

  // Run the whole block (blockIdx already set) to completion.
  void run(std::mt19937_64& rng) {
    const size_t n = fibers_.size();
    for (size_t i = 0; i < n; ++i) {
      Fiber& f = fibers_[i];
      f.state = State::kRunnable;
      f.phase = 0;
      f.tid = uint3{static_cast<unsigned>(i % dim_.x), static_cast<unsigned>((i / dim_.x) % dim_.y),
                    static_cast<unsigned>(i / (static_cast<size_t>(dim_.x) * dim_.y))};
      if (getcontext(&f.ctx) != 0) throw std::runtime_error("cuda_emu: getcontext failed");
      f.ctx.uc_stack.ss_sp = stacks_ + i * kStackBytes;
      f.ctx.uc_stack.ss_size = kStackBytes;
      f.ctx.uc_link = &sched_;
      makecontext(&f.ctx, &Block::entry, 0);
    }
    std::vector<size_t> order(n);
    for (size_t i = 0; i < n; ++i) order[i] = i;
    if (config().order == Order::kReverse) std::reverse(order.begin(), order.end());
    for (;;) {
      if (config().order == Order::kRandom) std::shuffle(order.begin(), order.end(), rng);
      bool ran = false;
      for (size_t i : order) {
        if (fibers_[i].state != State::kRunnable) continue;
        resume(i);
        ran = true;
      }
      if (ran) continue;
      if (release_warps()) continue;
      bool any_block = false, any_live = false;
      for (const Fiber& f : fibers_) {
        if (f.state != State::kDone) any_live = true;
        if (f.state == State::kBlockBarrier) any_block = true;
        if (f.state == State::kWarpBarrier) {
          throw std::runtime_error("cuda_emu: deadlock: a warp collective waits for lanes "
                                   "that wait at __syncthreads or have exited");
        }
      }
      if (!any_live) return;
      if (any_block) {
        // threads that exited no longer take part in __syncthreads
        for (Fiber& f : fibers_) {
          if (f.state == State::kBlockBarrier) f.state = State::kRunnable;
        }
        continue;
      }
      return;
    }
  }

  // ---- called from inside a fiber ----
  void sync_block() { yield(State::kBlockBarrier, 0); }
  void sync_warp(unsigned int mask) { yield(State::kWarpBarrier, mask); }

  // Lane `lane` of this thread's warp publishes v; after the warp's barrier every lane reads
  // the value published by lane src(lane). Two slots a lane, used alternately: a slot is
  // written again only after the next collective's barrier, which every lane passes only
  // after it has read the slot.
  uint64_t exchange(uint64_t v, unsigned int mask, int src_lane) {
    Fiber& f = fibers_[current_];
    const size_t warp_base = (current_ / 32) * 32;
    const int lane = static_cast<int>(current_ % 32);
    const int p = f.phase;
    f.phase ^= 1;
    slots_[2 * (warp_base + lane) + p] = v;
    sync_warp(mask);
    return slots_[2 * (warp_base + src_lane) + p];
  }

  size_t current() const { return current_; }
  size_t size() const { return fibers_.size(); }

  // The fibers' stacks: one buffer kept for the process (not zeroed: a launch per test case
  // would otherwise clear 16 MiB).
  static char* stack_arena(size_t bytes) {
    static std::unique_ptr<char[]> arena;
    static size_t size = 0;
    if (bytes > size) {
      arena.reset(new char[bytes]);
      size = bytes;
    }
    return arena.get();
  }

  static Block*& active() {
    static Block* b = nullptr;
    return b;
  }

 private:
  static void entry() {
    Block* b = active();
    b->finish_switch_in_fiber();
    b->body_();
    b->fibers_[b->current_].state = State::kDone;
#if FASTNOISE_EMU_ASAN
    __sanitizer_start_switch_fiber(nullptr, b->sched_bottom_, b->sched_size_);
#endif
    // returns to uc_link = the scheduler
  }

  void resume(size_t i) {
    current_ = i;
    threadIdx = fibers_[i].tid;
#if FASTNOISE_EMU_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, stacks_ + i * kStackBytes, kStackBytes);
#endif
    if (swapcontext(&sched_, &fibers_[i].ctx) != 0) {
      throw std::runtime_error("cuda_emu: swapcontext failed");
    }
#if FASTNOISE_EMU_ASAN
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  }

  void yield(State s, unsigned int mask) {
    Fiber& f = fibers_[current_];
    f.state = s;
    f.warp_mask = mask;
#if FASTNOISE_EMU_ASAN
    __sanitizer_start_switch_fiber(&f.fake_stack, sched_bottom_, sched_size_);
#endif
    swapcontext(&f.ctx, &sched_);
    finish_switch_in_fiber();
  }

  void finish_switch_in_fiber() {
#if FASTNOISE_EMU_ASAN
    __sanitizer_finish_switch_fiber(fibers_[current_].fake_stack, &sched_bottom_, &sched_size_);
#endif
    threadIdx = fibers_[current_].tid;
  }

  // Release every warp barrier whose lanes (those of its mask that have not exited) all wait
  // at a warp barrier. Returns whether any was released.
  bool release_warps() {
    bool released = false;
    const size_t n = fibers_.size();
    for (size_t base = 0; base < n; base += 32) {
      const size_t end = std::min(n, base + 32);
      unsigned int waiting = 0, mask = 0;
      for (size_t i = base; i < end; ++i) {
        if (fibers_[i].state == State::kWarpBarrier) {
          waiting |= 1u << (i - base);
          mask |= fibers_[i].warp_mask;
        }
      }
      if (waiting == 0) continue;
      unsigned int live = 0;
      for (size_t i = base; i < end; ++i) {
        if (fibers_[i].state != State::kDone) live |= 1u << (i - base);
      }
      const unsigned int need = mask & live;
      if ((waiting & need) != need) continue;  // some lane of the mask is still busy
      for (size_t i = base; i < end; ++i) {
        if ((waiting >> (i - base)) & 1u) fibers_[i].state = State::kRunnable;
      }
      released = true;
    }
    return released;
  }

  std::function<void()> body_;
  dim3 dim_;
  std::vector<Fiber> fibers_;
  char* stacks_;  // n stacks of kStackBytes
  std::vector<uint64_t> slots_;
  ucontext_t sched_;
  size_t current_ = 0;
  const void* sched_bottom_ = nullptr;
  size_t sched_size_ = 0;
};

inline Block& block() {
  Block* b = Block::active();
  if (b == nullptr) throw std::runtime_error("cuda_emu: a device built-in outside a kernel");
  return *b;
}

inline int lane_id() { return static_cast<int>(block().current() % 32); }

// kernel<<<grid, block>>>(args...): every block in the configured order, each block's threads
// as fibers.
template <typename... KArgs, typename... Args>
void launch(dim3 grid, dim3 blk, void (*kernel)(KArgs...), Args&&... args) {
  std::tuple<std::decay_t<KArgs>...> targs(static_cast<std::decay_t<KArgs>>(args)...);
  const size_t nblocks = static_cast<size_t>(grid.x) * grid.y * grid.z;
  if (nblocks == 0) throw std::runtime_error("cuda_emu: a launch of 0 blocks");
  std::mt19937_64 rng(config().seed);
  std::vector<size_t> order(nblocks);
  for (size_t i = 0; i < nblocks; ++i) order[i] = i;
  if (config().order == Order::kReverse) std::reverse(order.begin(), order.end());
  if (config().order == Order::kRandom) std::shuffle(order.begin(), order.end(), rng);
  Block b(blk, [&] { std::apply(kernel, targs); });
  Block::active() = &b;
  gridDim = grid;
  blockDim = blk;
  try {
    for (size_t id : order) {
      blockIdx = uint3{static_cast<unsigned>(id % grid.x),
                       static_cast<unsigned>((id / grid.x) % grid.y),
                       static_cast<unsigned>(id / (static_cast<size_t>(grid.x) * grid.y))};
      b.run(rng);
    }
  } catch (...) {
    Block::active() = nullptr;
    throw;
  }
  Block::active() = nullptr;
}

}  // namespace fastnoise_emu

// ---- barriers, fences, warp collectives ---------------------------------------------------
inline void __syncthreads() { fastnoise_emu::block().sync_block(); }
inline void __syncwarp(unsigned int mask = 0xffffffffu) { fastnoise_emu::block().sync_warp(mask); }
inline void __threadfence() {}
inline void __threadfence_block() {}
inline void __threadfence_system() {}

template <typename T>
inline T fastnoise_emu_shfl(unsigned int mask, T v, int src) {
  static_assert(sizeof(T) <= 8, "cuda_emu: shuffles of at most 8 bytes");
  uint64_t w = 0;
  std::memcpy(&w, &v, sizeof(T));
  const uint64_t r = fastnoise_emu::block().exchange(w, mask, src);
  T out;
  std::memcpy(&out, &r, sizeof(T));
  return out;
}
template <typename T>
inline T __shfl_sync(unsigned int mask, T v, int src, int width = 32) {
  const int lane = fastnoise_emu::lane_id();
  return fastnoise_emu_shfl(mask, v, (lane & ~(width - 1)) + (src & (width - 1)));
}
template <typename T>
inline T __shfl_down_sync(unsigned int mask, T v, unsigned int delta, int width = 32) {
  const int lane = fastnoise_emu::lane_id();
  const int in = lane & (width - 1);
  const int src = in + static_cast<int>(delta) < width ? lane + static_cast<int>(delta) : lane;
  return fastnoise_emu_shfl(mask, v, src);
}
template <typename T>
inline T __shfl_up_sync(unsigned int mask, T v, unsigned int delta, int width = 32) {
  const int lane = fastnoise_emu::lane_id();
  const int in = lane & (width - 1);
  const int src = in - static_cast<int>(delta) >= 0 ? lane - static_cast<int>(delta) : lane;
  return fastnoise_emu_shfl(mask, v, src);
}
template <typename T>
inline T __shfl_xor_sync(unsigned int mask, T v, int lane_mask, int width = 32) {
  const int lane = fastnoise_emu::lane_id();
  const int src = lane ^ lane_mask;
  return fastnoise_emu_shfl(mask, v, (src & ~(width - 1)) == (lane & ~(width - 1)) ? src : lane);
}
inline unsigned int __ballot_sync(unsigned int mask, int pred) {
  // every lane publishes its predicate; each reads all 32 after one barrier
  fastnoise_emu::Block& b = fastnoise_emu::block();
  const int lane = fastnoise_emu::lane_id();
  unsigned int r = 0;
  for (int src = 0; src < 32; ++src) {
    const uint64_t v = b.exchange(pred ? 1u : 0u, mask, src);
    if (v && ((mask >> src) & 1u)) r |= 1u << src;
  }
  (void)lane;
  return r;
}
inline int __any_sync(unsigned int mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned int mask, int pred) { return __ballot_sync(mask, pred) == mask; }

// ---- atomics (fibers switch only at barriers: a plain read-modify-write is atomic) -------
template <typename T>
inline T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
template <typename T>
inline T atomicSub(T* p, T v) {
  const T old = *p;
  *p = old - v;
  return old;
}
template <typename T>
inline T atomicExch(T* p, T v) {
  const T old = *p;
  *p = v;
  return old;
}
template <typename T>
inline T atomicCAS(T* p, T compare, T v) {
  const T old = *p;
  if (old == compare) *p = v;
  return old;
}
template <typename T>
inline T atomicMax(T* p, T v) {
  const T old = *p;
  *p = std::max(old, v);
  return old;
}
template <typename T>
inline T atomicMin(T* p, T v) {
  const T old = *p;
  *p = std::min(old, v);
  return old;
}
inline unsigned int atomicInc(unsigned int* p, unsigned int limit) {
  const unsigned int old = *p;
  *p = old >= limit ? 0u : old + 1u;
  return old;
}

// ---- loads with cache hints ---------------------------------------------------------------
template <typename T>
inline T __ldg(const T* p) { return *p; }
template <typename T>
inline T __ldcg(const T* p) { return *p; }
template <typename T>
inline T __ldca(const T* p) { return *p; }
template <typename T>
inline T __ldcs(const T* p) { return *p; }
template <typename T>
inline void __stcg(T* p, T v) { *p = v; }
template <typename T>
inline void __stcs(T* p, T v) { *p = v; }

// ---- integer and float intrinsics (built with -ffp-contract=off: one rounding each) --------
inline unsigned int __umulhi(unsigned int a, unsigned int b) {
  return static_cast<unsigned int>((static_cast<uint64_t>(a) * b) >> 32);
}
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
inline int __mulhi(int a, int b) {
  return static_cast<int>((static_cast<int64_t>(a) * b) >> 32);
}
inline int __popc(unsigned int v) { return __builtin_popcount(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline float __int_as_float(int v) { return fastnoise_emu::bits<float>(v); }
inline int __float_as_int(float v) { return fastnoise_emu::bits<int>(v); }
inline float __uint_as_float(unsigned int v) { return fastnoise_emu::bits<float>(v); }
inline unsigned int __float_as_uint(float v) { return fastnoise_emu::bits<unsigned int>(v); }
inline double __longlong_as_double(long long v) { return fastnoise_emu::bits<double>(v); }
inline long long __double_as_longlong(double v) { return fastnoise_emu::bits<long long>(v); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __dsqrt_rn(double a) { return std::sqrt(a); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
