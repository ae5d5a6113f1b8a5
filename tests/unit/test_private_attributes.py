"""No reads or writes of third-party objects' private attributes outside the hot-path modules
(issue 17: "0 reads of private attributes of third-party objects outside the named hot-path
modules").

An ``ast`` scan of ``src/regstream`` and ``tests``: every ``x._name`` (a leading underscore, not a
``__dunder__``) counts unless ``x`` is ``self``/``cls`` or ``_name`` is one of ours, that is
defined somewhere in the scanned code (a ``self._name =``, a ``def _name``, a class attribute,
an entry of ``__slots__``, a module-level ``_name``): then ``x`` is taken to be one of our
objects. ``x`` bound by an import of a third-party module (``uvicorn._x``) always counts. A
third-party private attribute whose name we also use for our own is not seen: the scan cannot
know ``x``'s type; review catches those.

``getattr``/``setattr``/``hasattr``/``delattr`` with a private name as a string count the same.
Public names with an underscore by design are not private: namedtuple's API (``_replace``,
``_asdict``, ``_fields``, ``_make``, ``_field_defaults``), ``os._exit``, and
``logging._srcfile``, the knob the logging HOWTO's "Optimization" section documents (logs.py).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "regstream"

#: The named hot-path modules: the only places that may touch third-party private parts.
HOT_PATH = {
    "src/regstream/api/takeover.py",  # the streams' take-over from uvicorn (docstring: versions)
}
PUBLIC_BY_DESIGN = {"_replace", "_asdict", "_fields", "_make", "_field_defaults"}
PUBLIC_BY_DESIGN_ON = {("os", "_exit"), ("logging", "_srcfile")}
REFLECTION = {"getattr", "setattr", "hasattr", "delattr"}


@dataclass(frozen=True)
class Access:
    path: str
    line: int
    text: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.text}"


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _defined_names(tree: ast.Module) -> Iterator[str]:
    """Names this module defines for its own objects and itself (not a function's locals)."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node.name
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                yield node.attr
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id == "setattr" and len(node.args) == 3:  # setattr(ours, "_x", …)
                yield from _strings(node.args[1])
        elif isinstance(node, ast.alias):
            yield (node.asname or node.name).rsplit(".", 1)[-1]
    scopes: list[ast.Module | ast.ClassDef] = [tree]
    scopes += [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    for scope in scopes:  # module-level and class-level names, ``__slots__`` entries
        for statement in scope.body:
            if isinstance(statement, (ast.Assign, ast.AnnAssign)):
                targets = statement.targets if isinstance(statement, ast.Assign) else [
                    statement.target
                ]  # fmt: skip
                for target in targets:
                    for name in ast.walk(target):
                        if isinstance(name, ast.Name):
                            yield name.id
                            if name.id == "__slots__" and statement.value is not None:
                                yield from _strings(statement.value)


def _strings(node: ast.AST) -> Iterator[str]:
    for const in ast.walk(node):
        if isinstance(const, ast.Constant) and isinstance(const.value, str):
            yield const.value


def _third_party_modules(tree: ast.Module) -> dict[str, str]:
    """Local names bound to imported third-party modules or objects (name -> module)."""
    bound: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] not in ("regstream", "tests"):
                    bound[alias.asname or alias.name.split(".")[0]] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] not in ("regstream", "tests"):
                for alias in node.names:
                    bound[alias.asname or alias.name] = node.module
    return bound


def third_party_private_accesses(sources: Iterable[tuple[str, str]]) -> list[Access]:
    """Every ``x._name`` in ``sources`` (path, text) on what is not one of the sources' own."""
    trees = [(path, ast.parse(text, filename=path)) for path, text in sources]
    ours = {name for _, tree in trees for name in _defined_names(tree) if _private(name)}
    found = []
    for path, tree in trees:
        imported = _third_party_modules(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.expr):
                continue
            accessed = _accessed(node)
            if accessed is None or not _private(accessed[1]):
                continue
            obj, name = accessed
            receiver = obj.id if isinstance(obj, ast.Name) else None
            if receiver in ("self", "cls") or name in PUBLIC_BY_DESIGN:
                continue
            if receiver is not None and (receiver, name) in PUBLIC_BY_DESIGN_ON:
                continue
            if name in ours and (receiver is None or receiver not in imported):
                continue
            found.append(Access(path, node.lineno, ast.unparse(node)))
    return found


def _accessed(node: ast.expr) -> tuple[ast.expr, str] | None:
    """``x._name`` or ``getattr(x, "_name", …)`` (and the other three): ``(x, "_name")``."""
    if isinstance(node, ast.Attribute):
        return node.value, node.attr
    if (
        isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        and node.func.id in REFLECTION and len(node.args) >= 2
        and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
    ):  # fmt: skip
        return node.args[0], node.args[1].value
    return None


def _sources(*folders: Path) -> list[tuple[str, str]]:
    return [
        (str(path.relative_to(ROOT)), path.read_text())
        for folder in folders
        for path in sorted(folder.rglob("*.py"))
    ]


def test_no_third_party_private_attributes_outside_the_hot_path() -> None:
    accesses = third_party_private_accesses(_sources(PACKAGE, ROOT / "tests"))
    outside = [str(a) for a in accesses if a.path not in HOT_PATH]
    assert outside == []


def test_the_scan_finds_private_reads_and_writes() -> None:
    """The scan on a small source of its own: what counts and what does not."""
    ours = '''
import os
import uvicorn
from collections import namedtuple
from redis.asyncio import Redis

class Mine:
    __slots__ = ("_slot",)

    def __init__(self) -> None:
        self._value = 1

    def _helper(self) -> None:
        pass

def use(mine: Mine, other: object, redis: Redis) -> None:
    mine._value, mine._slot = 2, 3  # ours: defined above
    mine._helper()
    other._secret = 1                # a write to a third party's private attribute
    print(redis._reader)             # a read
    print(uvicorn._helper)           # a third-party module's private name, even one we also use
    print(other.__dict__, namedtuple("P", "a")(1)._replace(a=2))
    print(getattr(redis, "_pool", None), getattr(mine, "_value"))
    os._exit(0)
'''
    found = third_party_private_accesses([("example.py", ours)])
    assert [a.text for a in found] == [
        "other._secret", "redis._reader", "uvicorn._helper", "getattr(redis, '_pool', None)"
    ]  # fmt: skip
    assert [a.line for a in found] == [19, 20, 21, 23]
