// fastppo's own CPU threads (the FASTPPO_THREADS=pool build), in place of an OpenMP runtime: a
// process that also runs torch then has one OpenMP runtime (torch's) instead of two competing for
// the cores. Workers are std::threads started at the first parallel call; the calling thread takes
// part 0 itself. Between calls a worker spins for a few microseconds (a kernel's passes follow each
// other that closely), then sleeps on a condition variable, so it never holds a core torch's
// threads need for longer than that.
#pragma once

namespace fastppo {
namespace pool {

using PartFn = void (*)(void* fn, int part, int parts);

// The threads a call runs on (the calling thread and threads() - 1 workers): FASTPPO_NUM_THREADS,
// else the first count of OMP_NUM_THREADS, else the CPUs in this process's affinity mask.
int threads();

// Runs part(fn, p, threads()) for every p in [0, threads()) and returns when all have returned;
// part 0 on the calling thread. The call runs serially, part(fn, 0, 1), when it comes from inside
// another call's part (a worker or the caller), when another thread's call has the pool, or with
// one thread. A part must not throw (as in an OpenMP region, it ends the process).
void run(PartFn part, void* fn);

}  // namespace pool
}  // namespace fastppo
