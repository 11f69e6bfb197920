"""Command line: ``fastppo train|eval|rlhf ...`` (also ``python -m fastppo train ...``).

Each command parses its own flags with tyro (``train.Args``, the arguments of
``evaluate.evaluate``, ``rlhf.run.RLHFArgs``); it is imported only when it runs, so
``fastppo --help`` does not import torch.
"""

from __future__ import annotations

import sys

COMMANDS = {"train": "train PPO on an EnvPool task (--resume RUN_DIR continues one)",
            "eval": "evaluate a saved policy: fastppo eval RUN_DIR --episodes N",
            "rlhf": "RLHF end to end on the offline digits task: SFT, reward model, PPO with a KL penalty"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else None
    if command == "train":
        from .train import main as run
    elif command == "eval":
        from .evaluate import eval_main as run
    elif command == "rlhf":
        from .rlhf.run import main as run
    else:
        usage = "usage: fastppo {train,eval,rlhf} ...\n\n" + "\n".join(f"  {k:8s}{v}" for k, v in COMMANDS.items())
        if command not in (None, "-h", "--help"):
            print(f"fastppo: unknown command {command!r}\n{usage}", file=sys.stderr)
            return 2
        print(usage)
        return 0 if command else 2
    return run(argv[1:])
