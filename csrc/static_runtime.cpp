// Compiled only with FASTPPO_STATIC_RUNTIME (the portable wheel), where libstdc++ is linked into the
// module. libstdc++'s std::random_device comes along with its string instantiations (fastppo never
// constructs one) and refers to arc4random, which glibc has had only since 2.36: that one reference
// would raise the wheel's manylinux tag from 2_34 to 2_36. Defined here (hidden), it is resolved
// inside the module, from getrandom (glibc 2.25), and the system's glibc is not asked for it.
#include <sys/random.h>

#include <cstdint>

extern "C" __attribute__((visibility("hidden"))) std::uint32_t arc4random(void) noexcept {
  std::uint32_t value = 0;
  while (getrandom(&value, sizeof value, 0) != static_cast<ssize_t>(sizeof value)) {
  }
  return value;
}
