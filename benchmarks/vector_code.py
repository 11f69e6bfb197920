"""Counts the vector instructions in the compiled loss loops: the check behind
benchmarks/results/loss_regression_cpu.md that each instruction-set copy of ``chunk_loss_unit`` (the
contiguous loop of ``fastppo.ppo_loss``) runs on vector registers.

The module fastppo installs is stripped, so compile the CPU kernels of a tree to an object file first
(the build's flags, no LTO, from the repository root of that tree):

    g++ -O3 -DNDEBUG -fPIC -fno-trapping-math -fopenmp -std=gnu++17 -DFASTPPO_ISA_COPIES=1 \\
        -DFASTPPO_WITH_CUDA=0 -Icsrc -I<build dir>/generated -c csrc/cpu_kernels.cpp -o /tmp/new.o
    python benchmarks/vector_code.py /tmp/old.o /tmp/new.o

Prints, per object, per copy (avx2, avx512) and dtype: instructions, those on ymm/zmm registers,
and scalar compares (ucomis*/comis*). A copy whose loop the compiler left scalar has a few hundred
vector instructions where a vectorized one has thousands.

    python benchmarks/vector_code.py --function masked_moments_unit /tmp/old.o /tmp/new.o

counts another function's instantiations instead (here the advantage moments of ppo_loss's pass 1
and of rlhf.masked_whiten).
"""

from __future__ import annotations

import collections
import re
import subprocess
import sys


def count(obj: str, function: str = "chunk_loss_unit<") -> dict:
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", obj], capture_output=True, text=True,
                             check=True).stdout
    totals = collections.defaultdict(lambda: [0, 0, 0])
    current = None
    for line in listing.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            name = head.group(1)
            current = None
            if function in name and "dispatch" not in name and "::baseline::" not in name:
                current = (re.search(r"fastppo::(\w+)::", name.replace("fastppo::Moments", "")).group(1),
                           "float" if "<float" in name else "double")
            continue
        if current and "\t" in line:
            instruction = line.split("\t", 1)[1]
            row = totals[current]
            row[0] += 1
            row[1] += "ymm" in instruction or "zmm" in instruction
            row[2] += bool(re.match(r"\s*v?u?comis[sd]", instruction))
    return dict(totals)


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    function = "chunk_loss_unit<"
    if len(args) >= 2 and args[0] == "--function":
        function, args = args[1], args[2:]
    if not args:
        print(__doc__)
        return 2
    print("| object | copy | dtype | instructions | on ymm/zmm | scalar compares |")
    print("|---|---|---|---:|---:|---:|")
    for obj in args:
        for (copy, dtype), (n, vector, scalar) in sorted(count(obj, function).items()):
            print(f"| {obj} | {copy} | {dtype} | {n:,} | {vector:,} | {scalar} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
