// fastppo's thread pool (thread_pool.h). One call at a time: the caller publishes (part, fn) and a
// new generation number under the mutex, wakes the workers, runs part 0, then waits for the count
// of running workers to reach zero. Each wait spins for at most kSpin before sleeping.
#include "thread_pool.h"

#include <pthread.h>
#include <sched.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <system_error>
#include <thread>

#include "parallel.h"

namespace fastppo {
namespace pool {
namespace {

// Long enough to catch a kernel's next pass (the serial step between two parallel loops is a few
// microseconds), short enough that a sleeping worker costs torch's threads nothing.
constexpr std::chrono::microseconds kSpin{4};

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Spins until ready() or kSpin has passed; returns ready().
template <typename Ready>
bool spin(const Ready& ready) {
  const auto start = std::chrono::steady_clock::now();
  for (int i = 1;; ++i) {
    if (ready()) return true;
    cpu_relax();
    if (i % 16 == 0 && std::chrono::steady_clock::now() - start > kSpin) return ready();
  }
}

// True on a worker, and on a caller while its call runs: a parallel call from there runs serially.
thread_local bool t_inside = false;

struct Pool {
  int size = 1;            // the caller and size - 1 workers
  std::mutex busy;         // held by the thread whose call runs
  std::mutex m;            // orders generation changes with the condition variables' waits
  std::condition_variable wake, done;
  std::atomic<uint64_t> generation{0};
  std::atomic<int> running{0};  // workers still in the current call's parts
  PartFn part = nullptr;
  void* fn = nullptr;
};

// A part that throws ends the process, as an exception leaving an OpenMP region does.
void run_part(PartFn part, void* fn, int index, int parts) noexcept { part(fn, index, parts); }

void work(Pool* p, int index) {
  t_inside = true;
  uint64_t seen = 0;
  for (;;) {
    if (!spin([&] { return p->generation.load(std::memory_order_acquire) != seen; })) {
      std::unique_lock<std::mutex> lock(p->m);
      p->wake.wait(lock, [&] { return p->generation.load(std::memory_order_acquire) != seen; });
    }
    seen = p->generation.load(std::memory_order_acquire);
    run_part(p->part, p->fn, index, p->size);
    if (p->running.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      // Taking the mutex orders this with the caller's check-then-wait: it cannot miss the notify.
      { std::lock_guard<std::mutex> lock(p->m); }
      p->done.notify_one();
    }
  }
}

int affinity_cpus() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  const unsigned n = std::thread::hardware_concurrency();
  return n > 0 ? static_cast<int>(n) : 1;
}

// The first count of OMP_NUM_THREADS ("4" or "4,2"), 0 when unset or not a positive integer (the
// variable belongs to the OpenMP runtimes, which ignore such values too).
int omp_num_threads() {
  const char* s = std::getenv("OMP_NUM_THREADS");
  if (s == nullptr) return 0;
  char* end = nullptr;
  const long n = std::strtol(s, &end, 10);
  if (end == s || (*end != '\0' && *end != ',') || n < 1 || n > 4096) return 0;
  return static_cast<int>(n);
}

// The pool of this process: created at the first parallel call, and again in a child after fork
// (the parent's workers do not exist there; its pool is left behind, never touched again).
std::atomic<Pool*> g_pool{nullptr};
std::mutex g_create;

void before_fork() { g_create.lock(); }
void after_fork_parent() { g_create.unlock(); }
void after_fork_child() {
  g_pool.store(nullptr, std::memory_order_relaxed);
  t_inside = false;
  g_create.unlock();
}

Pool* get_pool() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p != nullptr) return p;
  std::lock_guard<std::mutex> lock(g_create);
  p = g_pool.load(std::memory_order_acquire);
  if (p != nullptr) return p;
  static bool fork_handlers = false;
  if (!fork_handlers) {
    pthread_atfork(before_fork, after_fork_parent, after_fork_child);
    fork_handlers = true;
  }
  p = new Pool;  // lives as long as the process: detached workers use it until exit
  const int wanted = threads();
  // size counts the workers that started: a part's block comes from the size passed to it, so
  // fewer threads than asked (a process at its thread limit) still covers every iteration.
  for (int index = 1; index < wanted; ++index) {
    try {
      std::thread(work, p, index).detach();
    } catch (const std::system_error&) {
      break;
    }
    p->size = index + 1;
  }
  g_pool.store(p, std::memory_order_release);
  return p;
}

}  // namespace

int threads() {
  static const int n = [] {
    const int requested = requested_threads();
    if (requested > 0) return requested;
    const int omp = omp_num_threads();
    return omp > 0 ? omp : affinity_cpus();
  }();
  return n;
}

void run(PartFn part, void* fn) {
  if (t_inside || threads() == 1) return run_part(part, fn, 0, 1);
  Pool* p = get_pool();
  std::unique_lock<std::mutex> busy(p->busy, std::try_to_lock);
  if (!busy.owns_lock() || p->size == 1) return run_part(part, fn, 0, 1);
  p->part = part;
  p->fn = fn;
  p->running.store(p->size - 1, std::memory_order_relaxed);
  {
    std::lock_guard<std::mutex> lock(p->m);
    p->generation.fetch_add(1, std::memory_order_release);
  }
  p->wake.notify_all();
  t_inside = true;
  run_part(part, fn, 0, p->size);
  t_inside = false;
  const auto finished = [&] { return p->running.load(std::memory_order_acquire) == 0; };
  if (!spin(finished)) {
    std::unique_lock<std::mutex> lock(p->m);
    p->done.wait(lock, finished);
  }
}

}  // namespace pool
}  // namespace fastppo
