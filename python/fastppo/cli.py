"""Command line: ``fastppo train|eval|rlhf ...`` (also ``python -m fastppo train ...``).

Flags come from the ``Args`` dataclass: each field is a ``--kebab-case`` flag and the docstring
line under it is its help text, so the dataclass stays the one place settings are defined.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
import textwrap
import typing


def field_docs(cls) -> dict:
    """The docstring line under each field of a dataclass, read from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[node.target.id] = str(nxt.value.value).strip()
    return docs


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_dataclass(cls, argv=None, prog=None, description=None):
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        if typing.get_origin(kind) is typing.Union:  # Optional[X]
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        flag = "--" + field.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, type=_parse_bool, nargs="?", const=True, default=field.default,
                                metavar="BOOL", help=docs.get(field.name, ""))
        else:
            parser.add_argument(flag, type=kind, default=field.default, help=docs.get(field.name, ""))
    namespace = parser.parse_args(argv)
    return cls(**vars(namespace))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": "train PPO on an EnvPool task (--resume RUN_DIR continues one)",
                "eval": "evaluate a saved policy: fastppo eval RUN_DIR --episodes N",
                "rlhf": "RLHF end to end on the offline digits task: SFT, reward model, PPO with a KL penalty"}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        usage = "usage: fastppo {train,eval,rlhf} ...\n\n" + "\n".join(f"  {k:8s}{v}" for k, v in commands.items())
        if argv and argv[0] not in ("-h", "--help"):
            print(f"fastppo: unknown command {argv[0]!r}\n{usage}", file=sys.stderr)
            return 2
        print(usage)
        return 0 if argv else 2
    if argv[0] == "rlhf":
        from .rlhf import run

        return run.main(argv[1:])
    from . import evaluate, train

    return train.main(argv[1:]) if argv[0] == "train" else evaluate.eval_main(argv[1:])
