"""Command line: ``fastppo train|eval|plot|export|rlhf ...`` (also ``python -m fastppo train ...``).

Each command parses its own flags with tyro (``train.Args``, the arguments of
``evaluate.evaluate``, ``plot.PlotArgs``, ``export.ExportArgs``, ``rlhf.run.RLHFArgs``); it is
imported only when it runs, so ``fastppo --help`` does not import torch. ``fastppo --version`` prints
the version and how this fastppo was built (``fastppo.build_info()``, one part a line).
"""

from __future__ import annotations

import sys

COMMANDS = {"train": "train PPO on an EnvPool or gymnasium task, or your own (--env-id my_pkg.envs:MyEnv-v0); "
                     "--track logs to W&B, --capture-video records videos (--resume RUN_DIR continues a run)",
            "eval": "evaluate a saved policy: fastppo eval RUN_DIR --episodes N [--video FILE.mp4]",
            "plot": "learning curves of runs: fastppo plot RUN_DIR... [--x steps|seconds] [--metric NAME] [--out FILE.png]",
            "export": "a policy that runs without fastppo: fastppo export RUN_DIR --format onnx|torchscript --out FILE",
            "rlhf": "RLHF end to end on the offline digits task: SFT, reward model, PPO with a KL penalty"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else None
    if command == "train":
        from .train import main as run
    elif command == "eval":
        from .evaluate import eval_main as run
    elif command == "plot":
        from .plot import plot_main as run
    elif command == "export":
        from .export import export_main as run
    elif command == "rlhf":
        from .rlhf.run import main as run
    elif command in ("--version", "-V"):
        from . import _build_info_parts

        print("\n".join(_build_info_parts()))  # the first line is `fastppo <version>`
        return 0
    else:
        usage = "usage: fastppo {train,eval,plot,export,rlhf} ... | fastppo --version\n\n" + "\n".join(f"  {k:8s}{v}" for k, v in COMMANDS.items())
        if command not in (None, "-h", "--help"):
            print(f"fastppo: unknown command {command!r}\n{usage}", file=sys.stderr)
            return 2
        print(usage)
        return 0 if command else 2
    return run(argv[1:])
