// The CPU emulator's runtime: the fiber scheduler behind emulator.h (see the execution model there).
#include "emulator.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace h1r::emu {
namespace {

constexpr size_t kStackBytes = 64 * 1024;

// ---- context switch ---------------------------------------------------------------------------------
#if defined(__x86_64__)
// h1r_emu_switch(save, to): push the callee-saved registers, store the stack pointer in *save, load `to`
// and pop the registers saved there (System V ABI: rbx, rbp, r12-r15 are callee-saved; the floating
// point control state is left alone, kernels never change it).
extern "C" void h1r_emu_switch(void** save, void* to);
asm(R"(
  .text
  .globl h1r_emu_switch
  .hidden h1r_emu_switch
  .type h1r_emu_switch, @function
h1r_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size h1r_emu_switch, .-h1r_emu_switch
)");

struct Context {
  void* sp = nullptr;
};
// A fresh stack whose first switch "returns" into entry() with the ABI's alignment (rsp = 8 mod 16).
void make_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                           // entry's (never used) return address
  *--sp = reinterpret_cast<void*>(entry);    // popped by `ret`
  for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp rbx r12 r13 r14 r15
  c.sp = sp;
}
inline void switch_context(Context& from, Context& to) { h1r_emu_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};
void make_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// ---- scheduler state (one launch at a time) ---------------------------------------------------------
enum class State : uint8_t { kRunnable, kAtBlockBarrier, kAtWarpBarrier, kDone };

struct Fiber {
  Context ctx;
  State state;
  unsigned warp, lane;
  uint64_t collectives;  // warp collectives passed: picks the slot array (parity)
  dim3 tid;
};

struct Warp {
  unsigned lanes = 0, live = 0, waiting = 0;
  unsigned parity = 0;  // slot array of the collective being gathered
  uint32_t arrived = 0;  // lanes that deposited in it so far
  WarpSlots slots[2];
};

std::mutex g_launch_mutex;
std::vector<char> g_stacks;
std::vector<Fiber> g_fibers;
std::vector<Warp> g_warps;
std::vector<unsigned char> g_dynamic_smem;
Context g_scheduler;
unsigned g_current = 0, g_live = 0, g_at_block_barrier = 0;
void (*g_body)(void*) = nullptr;
void* g_body_ctx = nullptr;
std::string g_error;
int g_order = 0;
std::mt19937_64 g_rng(0);
Stats g_stats{};

void release_block() {
  for (auto& f : g_fibers)
    if (f.state == State::kAtBlockBarrier) f.state = State::kRunnable;
  g_at_block_barrier = 0;
  ++g_stats.block_barriers;
}
void release_warp(unsigned w) {
  for (size_t i = size_t(w) * 32; i < std::min(g_fibers.size(), size_t(w + 1) * 32); ++i)
    if (g_fibers[i].state == State::kAtWarpBarrier) g_fibers[i].state = State::kRunnable;
  Warp& warp = g_warps[w];
  warp.slots[warp.parity].present = warp.arrived;  // the readers see who took part
  warp.arrived = 0;
  warp.waiting = 0;
  ++g_stats.warp_collectives;
}

// Back to the scheduler; returns when the scheduler resumes this fiber.
void yield() {
  ++g_stats.fiber_switches;
  switch_context(g_fibers[g_current].ctx, g_scheduler);
}

void fiber_entry() {
  g_body(g_body_ctx);
  Fiber& f = g_fibers[g_current];
  f.state = State::kDone;
  --g_live;
  Warp& w = g_warps[f.warp];
  --w.live;
  // An exited thread no longer holds back a barrier its peers are waiting at.
  if (g_at_block_barrier > 0 && g_at_block_barrier == g_live) release_block();
  if (w.waiting > 0 && w.waiting == w.live) release_warp(f.warp);
  switch_context(f.ctx, g_scheduler);
  std::abort();  // a finished fiber is never resumed
}

std::string deadlock_message() {
  unsigned at_block = 0, at_warp = 0, done = 0;
  for (auto& f : g_fibers) {
    at_block += f.state == State::kAtBlockBarrier;
    at_warp += f.state == State::kAtWarpBarrier;
    done += f.state == State::kDone;
  }
  char buf[256];
  std::snprintf(buf, sizeof buf,
                "h1r CUDA emulator: deadlock in block (%u, %u, %u): %u threads at __syncthreads, %u at a warp "
                "collective, %u exited (divergent barrier)",
                blockIdx.x, blockIdx.y, blockIdx.z, at_block, at_warp, done);
  return buf;
}

void run_block(unsigned nthreads, std::vector<unsigned>& order) {
  unsigned nwarps = (nthreads + 31) / 32;
  for (unsigned w = 0; w < nwarps; ++w) {
    g_warps[w].lanes = g_warps[w].live = std::min(32u, nthreads - 32 * w);
    g_warps[w].waiting = 0;
    g_warps[w].arrived = 0;
  }
  for (unsigned i = 0; i < nthreads; ++i) {
    Fiber& f = g_fibers[i];
    f.state = State::kRunnable;
    f.warp = i / 32;
    f.lane = i % 32;
    f.collectives = 0;
    f.tid = dim3(i % blockDim.x, (i / blockDim.x) % blockDim.y, i / (blockDim.x * blockDim.y));
    make_context(f.ctx, g_stacks.data() + size_t(i) * kStackBytes, kStackBytes, fiber_entry);
  }
  g_live = nthreads;
  g_at_block_barrier = 0;
  if (!g_dynamic_smem.empty()) std::memset(g_dynamic_smem.data(), 0xff, g_dynamic_smem.size());

  while (g_live > 0) {
    if (g_order == 2) std::shuffle(order.begin(), order.end(), g_rng);
    bool ran = false;
    for (unsigned k = 0; k < nthreads; ++k) {
      unsigned i = g_order == 1 ? nthreads - 1 - k : order[k];
      if (g_fibers[i].state != State::kRunnable) continue;
      g_current = i;
      threadIdx = g_fibers[i].tid;
      switch_context(g_scheduler, g_fibers[i].ctx);
      ran = true;
    }
    if (!ran) {
      g_error = deadlock_message();
      return;
    }
  }
}

}  // namespace

const char* launch(dim3 grid, dim3 block, size_t dynamic_smem, void (*body)(void*), void* ctx) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024 || block.z > 64 || grid.y > 65535 || grid.z > 65535 ||
      dynamic_smem > 227 * 1024)
    return "h1r CUDA emulator: invalid configuration argument (block > 1024 threads, grid.y/z > 65535 or "
           "dynamic shared memory > 227 KiB)";
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return nullptr;
  if (g_stacks.size() < nthreads * kStackBytes) g_stacks.resize(nthreads * kStackBytes);
  g_fibers.resize(nthreads);
  g_warps.resize((nthreads + 31) / 32);
  g_dynamic_smem.assign(dynamic_smem, 0xff);
  g_body = body;
  g_body_ctx = ctx;
  g_error.clear();
  blockDim = block;
  gridDim = grid;
  std::vector<unsigned> order(nthreads);
  for (unsigned i = 0; i < nthreads; ++i) order[i] = i;
  ++g_stats.launches;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = dim3(x, y, z);
        ++g_stats.blocks;
        run_block(unsigned(nthreads), order);
        if (!g_error.empty()) {
          static thread_local std::string message;
          message = g_error;
          return message.c_str();
        }
      }
  return nullptr;
}

void sync_block() {
  g_fibers[g_current].state = State::kAtBlockBarrier;
  if (++g_at_block_barrier == g_live) release_block();
  yield();
}

const WarpSlots& warp_exchange(uint64_t v) {
  Fiber& f = g_fibers[g_current];
  Warp& w = g_warps[f.warp];
  w.parity = unsigned(f.collectives++ & 1);
  WarpSlots& slots = w.slots[w.parity];
  slots.value[f.lane] = v;
  w.arrived |= 1u << f.lane;
  f.state = State::kAtWarpBarrier;
  if (++w.waiting == w.live) release_warp(f.warp);
  yield();
  return slots;
}

unsigned lane_id() { return g_fibers[g_current].lane; }
unsigned warp_lane_count() { return g_warps[g_fibers[g_current].warp].lanes; }
void* dynamic_smem() { return g_dynamic_smem.data(); }

void set_schedule(int order, uint64_t seed) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  g_order = order;
  g_rng.seed(seed);
}

Stats stats() { return g_stats; }

}  // namespace h1r::emu
