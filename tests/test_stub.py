"""python/fastppo/_C.pyi declares exactly what the compiled module exports, with pybind11's
parameter names (read from the signature line pybind11 puts first in each ``__doc__``)."""

from __future__ import annotations

import ast
import builtins
import re
from pathlib import Path

import pytest

from fastppo import _C

STUB = Path(__file__).resolve().parents[1] / "python" / "fastppo" / "_C.pyi"
MODULE_DUNDERS = {"__doc__", "__file__", "__loader__", "__name__", "__package__", "__spec__"}


def is_public(name: str) -> bool:
    return not name.startswith("_") or (name.startswith("__") and name.endswith("__"))


def stub_entries(body: list) -> dict:
    """Public name -> its ast node (function, class or annotated variable) among ``body``."""
    entries = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            entries[node.name] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            entries[node.target.id] = node
    return {name: node for name, node in entries.items() if is_public(name)}


STUB_TREE = ast.parse(STUB.read_text())
ENTRIES = stub_entries(STUB_TREE.body)


def pybind_parameters(fn) -> list:
    """Parameter names of a pybind11 function from the first line of its ``__doc__``:
    ``name(a: type, b: type) -> type``."""
    signature = fn.__doc__.splitlines()[0]
    inside = signature[signature.index("(") + 1:signature.rindex(")")]
    return re.findall(r"(\w+): ", inside)


def stub_parameters(node: ast.FunctionDef) -> list:
    return [a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs]


def test_stub_declares_exactly_the_public_names_of_the_module():
    module = {name for name in dir(_C) if is_public(name)} - MODULE_DUNDERS
    assert set(ENTRIES) == module, (sorted(set(ENTRIES) - module), sorted(module - set(ENTRIES)))


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_stub_entry_matches_the_module(name):
    node, value = ENTRIES[name], getattr(_C, name)
    if isinstance(node, ast.AnnAssign):
        assert not callable(value), name
        assert type(value) is getattr(builtins, ast.unparse(node.annotation)), (name, value)
    elif isinstance(node, ast.FunctionDef):
        assert callable(value) and not isinstance(value, type), name
        assert stub_parameters(node) == pybind_parameters(value), name
    else:
        assert isinstance(value, type), name
        methods = stub_entries(node.body)
        exported = {k for k, v in vars(value).items() if not k.startswith("_") or k == "__init__"}
        assert set(methods) == exported, (name, sorted(set(methods) ^ exported))
        for method, member in methods.items():
            attribute = vars(value)[method]
            if isinstance(attribute, property):
                assert any(ast.unparse(d) == "property" for d in member.decorator_list), (name, method)
            else:
                assert stub_parameters(member) == pybind_parameters(attribute), (name, method)
