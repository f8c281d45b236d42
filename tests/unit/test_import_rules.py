"""The layout is the architecture: enforce who may import whom.

* ``enclave_app`` (measured into PCR0/PCR2) and ``parent_app`` (untrusted) never import each other.
* Neither imports ``nitrovault.local``: the local stand-ins are chosen only at composition roots
  (``nitrovault.cli.local_*``) and in tests, so production code cannot reach a fake by accident.
* The shared core ``nitrovault`` (outside ``nitrovault.local`` and the CLI composition roots) imports
  neither app nor the stand-ins.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _violations(package: str, forbidden: tuple[str, ...], exempt: tuple[str, ...] = ()) -> list[str]:
    found = []
    for path in sorted((REPO / package).rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if any(rel.startswith(e) for e in exempt) or "/gen/" in rel:
            continue
        for name in _imports(path):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                found.append(f"{rel} imports {name}")
    return found


@pytest.mark.parametrize(
    ("package", "forbidden", "exempt"),
    [
        ("enclave_app", ("parent_app", "nitrovault.local"), ()),
        ("parent_app", ("enclave_app", "nitrovault.local"), ()),
        (
            "nitrovault",
            ("enclave_app", "parent_app", "nitrovault.local"),
            ("nitrovault/local/", "nitrovault/cli/"),
        ),
    ],
)
def test_import_rules(package: str, forbidden: tuple[str, ...], exempt: tuple[str, ...]) -> None:
    assert _violations(package, forbidden, exempt) == []


def test_rule_checker_sees_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "m.py"
    bad.write_text("from nitrovault.local.nsm import LocalNsmDevice\nimport parent_app.main\n")
    assert {"nitrovault.local.nsm", "parent_app.main"} <= _imports(bad)
