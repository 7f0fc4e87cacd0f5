// AMX (Advanced Matrix Extensions) availability, shared by every kernel family that multiplies bf16 on tiles
// (linear, selective_scan). The tile helpers themselves (config, transposes) are in cpu/amx_tiles.h.
#pragma once

namespace h1r::cpu {

// Whether this process may multiply bf16 on AMX tiles: the CPU has AMX-TILE and AMX-BF16, the ISA in use is
// avx512, the OS granted the tile state (Linux's arch_prctl, asked once) and H1R_CPU_NO_AMX is not set.
bool amx_usable();

}  // namespace h1r::cpu
