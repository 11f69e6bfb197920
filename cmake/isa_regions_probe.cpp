// Compiles only where the compiler applies the per-function instruction-set regions of
// csrc/cpu_isa_regions.h (CMakeLists.txt enables the AVX2 and AVX-512 copies on that).
#include "cpu_isa_regions.h"

FASTPPO_TARGET_PUSH_AVX2
namespace avx2 {
FASTPPO_ISA_GUARD_AVX2
}  // namespace avx2
FASTPPO_TARGET_POP
FASTPPO_TARGET_PUSH_AVX512
namespace avx512 {
FASTPPO_ISA_GUARD_AVX512
}  // namespace avx512
FASTPPO_TARGET_POP

int main() { return 0; }
