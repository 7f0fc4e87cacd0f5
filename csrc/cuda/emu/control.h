// Controls of the CUDA emulator (emulator.h) that the host side may call: no CUDA names, so a torch
// translation unit can include it.
#pragma once

#include <cstdint>

namespace h1r::emu {

// Fiber order between barriers: 0 forward (thread 0 first), 1 reverse, 2 random (seeded).
void set_schedule(int order, uint64_t seed);
struct Stats {
  uint64_t launches, blocks, fiber_switches, block_barriers, warp_collectives;
};
Stats stats();

}  // namespace h1r::emu
