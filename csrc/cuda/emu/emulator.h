// CPU emulator of the CUDA surface in ../portability.h (g++ -DH1R_CUDA_EMULATOR). Used by the tests to
// run the very same kernel source on CPU tensors; not built into h1r_ops._C.
//
// Execution model
//   * A launch runs its blocks one after another, in blockIdx order (x fastest). Launches are serialized
//     process-wide (a mutex), so the coordinates and the static __shared__ variables below can be plain
//     globals: `__shared__` becomes `static`, i.e. one copy reused by every block, as on a GPU where a
//     block must not expect anything in shared memory it did not write itself. Dynamic shared memory is a
//     per-launch buffer refilled with 0xFF bytes (NaN as floats) before every block, so a read of a slot
//     nobody wrote shows up as NaN.
//   * The threads of a block are fibers, one small stack each (64 KiB, pooled). A scheduler sweeps over
//     the runnable fibers in the selected order and runs each until it blocks: at __syncthreads (blocks
//     until every live thread of the block is there), at a warp collective (until every live lane of the
//     warp is there) or at its end. Exited threads no longer count towards barriers (Volta semantics).
//     A sweep that finds nothing runnable while threads are still waiting is a deadlock (e.g. part of a
//     warp at __syncthreads and part at a shuffle): the launch stops and returns an error message.
//   * Warp collectives: each lane deposits its value in a per-warp slot array and waits at the warp
//     barrier; then it reads the lane it wants. Two slot arrays are used alternately, which makes one
//     barrier per collective enough (a lane cannot deposit twice ahead before every lane has read). The
//     mask argument is not interpreted: all live lanes of the warp must take part, as in our kernels.
//     Lanes that do not exist (a block size that is not a multiple of 32) or have exited before the collective read as the
//     caller's own value.
//   * Fibers switch only at those points, so plain loads and stores and the atomics are atomic with
//     respect to each other, and a run is deterministic for a given schedule order.
//   * Context switches use a 14-instruction stack switch on x86-64 and ucontext elsewhere.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>

#include "control.h"

// ---- CUDA keywords -----------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __shared__ static
#define H1R_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(::h1r::emu::dynamic_smem())

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
typedef struct CUstream_st* cudaStream_t;
constexpr int warpSize = 32;

// The coordinates of the running fiber (set by the scheduler before every switch to a fiber).
extern dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace h1r::emu {

// Run `body(ctx)` as a kernel. Returns nullptr, or a message (invalid configuration, deadlock, ...).
const char* launch(dim3 grid, dim3 block, size_t dynamic_smem, void (*body)(void*), void* ctx);

void sync_block();                     // __syncthreads
// One warp collective: the lanes' deposits, and which lanes made one (the live lanes of the warp).
struct WarpSlots {
  uint64_t value[32];
  uint32_t present;
};
const WarpSlots& warp_exchange(uint64_t v);  // deposit v, wait for the warp's live lanes, read them
unsigned lane_id();
unsigned warp_lane_count();  // lanes of the calling warp that exist (32 but for a last partial warp)
void* dynamic_smem();


template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp collectives move values up to 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}
// Exchange through the warp and read lane `src` (the caller's own value when src is not a live lane).
template <typename T>
inline T shuffle_from(T v, int src) {
  const WarpSlots& slots = warp_exchange(to_bits(v));
  if (src < 0 || src >= 32 || !(slots.present >> src & 1u)) return v;
  return from_bits<T>(slots.value[src]);
}

}  // namespace h1r::emu

// ---- barriers and warp collectives ---------------------------------------------------------------------
inline void __syncthreads() { ::h1r::emu::sync_block(); }
inline void __syncwarp(unsigned = 0xffffffffu) { ::h1r::emu::warp_exchange(0); }

template <typename T>
inline T __shfl_sync(unsigned, T v, int src_lane, int width = warpSize) {
  int lane = (int)::h1r::emu::lane_id();
  return ::h1r::emu::shuffle_from(v, (lane & ~(width - 1)) + (src_lane & (width - 1)));
}
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask, int width = warpSize) {
  int lane = (int)::h1r::emu::lane_id();
  int src = lane ^ lane_mask;
  // A lane may read an earlier group of `width` lanes, not a later one (then it keeps its own value).
  if ((src & ~(width - 1)) > (lane & ~(width - 1))) src = lane;
  return ::h1r::emu::shuffle_from(v, src);
}
template <typename T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta, int width = warpSize) {
  int lane = (int)::h1r::emu::lane_id();
  int src = ((lane & (width - 1)) + (int)delta < width) ? lane + (int)delta : lane;
  return ::h1r::emu::shuffle_from(v, src);
}
template <typename T>
inline T __shfl_up_sync(unsigned, T v, unsigned delta, int width = warpSize) {
  int lane = (int)::h1r::emu::lane_id();
  int src = ((lane & (width - 1)) >= (int)delta) ? lane - (int)delta : lane;
  return ::h1r::emu::shuffle_from(v, src);
}
inline unsigned __ballot_sync(unsigned, int pred) {
  const ::h1r::emu::WarpSlots& slots = ::h1r::emu::warp_exchange(pred != 0);
  unsigned m = 0;
  for (unsigned l = 0; l < 32; ++l) m |= (slots.present >> l & 1u) && slots.value[l] != 0 ? 1u << l : 0u;
  return m;
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) {
  unsigned n = ::h1r::emu::warp_lane_count();
  unsigned full = n == 32 ? 0xffffffffu : ((1u << n) - 1u);
  return __ballot_sync(mask, pred) == full;
}

// ---- atomics (fibers never switch inside them, so plain read-modify-write is atomic) -------------------
namespace h1r::emu {
// *p = f(*p); returns the old value.
template <typename T, typename F>
inline T read_modify_write(T* p, F f) {
  const T old = *p;
  *p = f(old);
  return old;
}
}  // namespace h1r::emu
template <typename T>
inline T atomicAdd(T* p, T v) { return ::h1r::emu::read_modify_write(p, [v](T o) { return o + v; }); }
template <typename T>
inline T atomicMax(T* p, T v) { return ::h1r::emu::read_modify_write(p, [v](T o) { return o < v ? v : o; }); }
template <typename T>
inline T atomicMin(T* p, T v) { return ::h1r::emu::read_modify_write(p, [v](T o) { return v < o ? v : o; }); }
template <typename T>
inline T atomicExch(T* p, T v) { return ::h1r::emu::read_modify_write(p, [v](T) { return v; }); }
template <typename T>
inline T atomicCAS(T* p, T compare, T v) {
  return ::h1r::emu::read_modify_write(p, [=](T o) { return o == compare ? v : o; });
}

// ---- math intrinsics (exact versions; nvcc's fast-math ones are within a few ulp) ---------------------
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline int __float_as_int(float x) { return ::h1r::emu::from_bits<int>(::h1r::emu::to_bits(x)); }
inline float __int_as_float(int x) { return ::h1r::emu::from_bits<float>(::h1r::emu::to_bits(x)); }

// ---- half and bfloat16: 16-bit storage, explicit round-to-nearest-even conversions ------------------
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half h) {
  uint32_t sign = uint32_t(h.bits & 0x8000u) << 16, exp = (h.bits >> 10) & 0x1fu, man = h.bits & 0x3ffu;
  uint32_t f;
  if (exp == 0) {  // zero or subnormal: man * 2^-24
    float v = std::ldexp(static_cast<float>(man), -24);
    return sign ? -v : v;
  } else if (exp == 31) {
    f = sign | 0x7f800000u | (man << 13);
  } else {
    f = sign | ((exp + 112u) << 23) | (man << 13);
  }
  return ::h1r::emu::from_bits<float>(f);
}
inline __half __float2half_rn(float v) {
  uint32_t x = (uint32_t)::h1r::emu::to_bits(v);
  uint16_t sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return {uint16_t(sign | (x > 0x7f800000u ? 0x7e00u : 0x7c00u))};  // nan, inf
  if (x >= 0x477ff000u) return {uint16_t(sign | 0x7c00u)};  // rounds past 65504
  if (x < 0x38800000u) {                                   // below 2^-14: subnormal half (or zero)
    return {uint16_t(sign | (uint16_t)std::nearbyint(std::fabs(v) * 16777216.0f))};
  }
  x += 0xfffu + ((x >> 13) & 1u);  // round to nearest even at bit 13
  return {uint16_t(sign | ((x - 0x38000000u) >> 13))};
}
inline float __bfloat162float(__nv_bfloat16 h) { return ::h1r::emu::from_bits<float>(uint32_t(h.bits) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t x = (uint32_t)::h1r::emu::to_bits(v);
  if ((x & 0x7fffffffu) > 0x7f800000u) return {uint16_t((x >> 16) | 0x40u)};  // quiet nan
  x += 0x7fffu + ((x >> 16) & 1u);
  return {uint16_t(x >> 16)};
}

namespace h1r::cuda {

// Launch `kernel` (the emulator runs it before returning); nullptr on success, else a message.
template <typename... Params, typename... Args>
inline const char* launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t dynamic_smem, cudaStream_t,
                          Args... args) {
  struct Closure {
    void (*kernel)(Params...);
    std::tuple<Params...> args;
  } closure{kernel, std::tuple<Params...>(static_cast<Params>(args)...)};
  auto body = [](void* c) {
    auto* cl = static_cast<Closure*>(c);
    std::apply(cl->kernel, cl->args);
  };
  return ::h1r::emu::launch(grid, block, dynamic_smem, body, &closure);
}

}  // namespace h1r::cuda
