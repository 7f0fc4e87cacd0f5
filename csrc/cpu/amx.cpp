// Whether this process may run AMX tile instructions (csrc/cpu/amx.h).
#include "cpu/amx.h"

#include <cstdlib>
#if defined(__x86_64__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "cpu/isa.h"

namespace h1r::cpu {

bool amx_usable() {
  static const bool usable = [] {
#if defined(__x86_64__)
    if (cpu_isa() != Isa::avx512 || std::getenv("H1R_CPU_NO_AMX") != nullptr) return false;
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    const bool amx_bf16 = (edx >> 22) & 1, amx_tile = (edx >> 24) & 1;
    if (!amx_bf16 || !amx_tile) return false;
    // Linux hands out the 8 KiB tile state only on request (oneDNN makes the same one)
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
  }();
  return usable;
}

}  // namespace h1r::cpu
