"""Old public names that keep working for one release, with a DeprecationWarning naming the new one."""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


def warn_renamed(old: str, new: str, stacklevel: int = 3) -> None:
    """The DeprecationWarning of a renamed public name: ``old`` still works this release, ``new``
    is its name from now on. ``stacklevel`` 3 points at the caller of the function that warns."""
    warnings.warn(f"{old} is renamed {new}; the old name goes in the next release", DeprecationWarning,
                  stacklevel=stacklevel)


def renamed_keywords(fn_name: str, **renames: str) -> Callable[[F], F]:
    """Decorator: each old keyword (``old="new"``) still works, warns and is passed on as the new one.

    Giving an old keyword together with its new one (by keyword or by position) is a TypeError naming
    both. The signature (``inspect.signature``, help()) shows only the new names.
    """

    def decorate(fn: F) -> F:
        parameters = inspect.signature(fn).parameters.values()
        # How many positional arguments it takes to reach each new name (None: keyword-only).
        reach = {p.name: i + 1 if p.kind is p.POSITIONAL_OR_KEYWORD else None for i, p in enumerate(parameters)}
        missing = set(renames.values()) - reach.keys()
        if missing:
            raise TypeError(f"{fn_name} has no parameter {sorted(missing)} to rename to")

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if kwargs and not renames.keys().isdisjoint(kwargs):
                for old, new in renames.items():
                    if old not in kwargs:
                        continue
                    if new in kwargs or (reach[new] is not None and len(args) >= reach[new]):
                        raise TypeError(f"{fn_name}: got both {old}= and {new}=; {old} is the old name of {new}, "
                                        f"pass {new} only")
                    warn_renamed(f"{fn_name}'s keyword {old}", new)
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
