"""The enclave image allowlist (``nitrovault/image.py``) is closed, minimal and enforced, and the pure
packages stay pure.

Closed: every module the enclave imports (followed statically from every ``enclave_app`` module) is on
the list, and the enclave's modules import with only the listed files present. Minimal: every listed
module is imported by the enclave. Enforced: ``prune`` leaves exactly the list, ``check`` fails on an
extra file, a listed file that is missing fails the build.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nitrovault import image

REPO = Path(__file__).resolve().parents[2]

#: the packages whose modules must not reach the network, processes, AWS, gRPC or torch
PURE = ("nitrovault.attestation", "nitrovault.envelope", "nitrovault.policy", "nitrovault.protection",
        "nitrovault.watermark", "nitrovault.access", "nitrovault.receipts", "nitrovault.audit")
#: modules of a pure package that are its adapter to an impure library, by design
ADAPTERS = frozenset({"nitrovault.envelope.torch_load"})
FORBIDDEN = frozenset({"socket", "asyncio", "boto3", "botocore", "grpc", "subprocess", "torch"})


def _modules(root: Path) -> dict[str, Path]:
    found = {}
    for package in image.IMAGE_PACKAGES:
        for path in (root / package).rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules(REPO)


def imports_of(name: str, source: str, *, is_package: bool) -> set[str]:
    """Every dotted name ``source`` imports (absolute; relative imports resolved against ``name``)."""
    base = name.split(".") if is_package else name.split(".")[:-1]
    out: set[str] = set()
    tree = ast.parse(source)
    for node in ast.walk(tree):  # imports only for type checkers run nothing: drop them first
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                module = ".".join(base[: len(base) - node.level + 1] + ([module] if module else []))
            out.add(module)
            out.update(f"{module}.{alias.name}" for alias in node.names)
    return out


def _ours(imported: set[str]) -> set[str]:
    """Our modules among ``imported`` (a name and each of its parent packages that is a module)."""
    found = set()
    for dotted in imported:
        parts = dotted.split(".")
        found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in MODULES)
    return found


def closure(roots: set[str], *, leaves: frozenset[str] = frozenset()) -> set[str]:
    """``roots`` and every module of ours they import, transitively (not through ``leaves``)."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen or name in leaves:
            continue
        seen.add(name)
        path = MODULES[name]
        todo.extend(_ours(imports_of(name, path.read_text(), is_package=path.name == "__init__.py")))
    return seen


def _listed_modules() -> set[str]:
    listed = {rel for rel, _ in image.image_files(REPO, strict=True)}
    return {name for name, path in MODULES.items() if path.relative_to(REPO).as_posix() in listed}


def test_every_module_the_enclave_imports_is_in_the_image() -> None:
    enclave = closure({m for m in MODULES if m.split(".")[0] == "enclave_app"})
    assert sorted(enclave - _listed_modules()) == []


def test_every_module_in_the_image_is_imported_by_the_enclave() -> None:
    enclave = closure({m for m in MODULES if m.split(".")[0] == "enclave_app"})
    assert sorted(_listed_modules() - enclave) == []


def test_what_the_enclave_must_never_run_is_not_in_the_image() -> None:
    listed = {rel for rel, _ in image.image_files(REPO)}
    for rel in ("nitrovault/local/stack.py", "nitrovault/cli/__init__.py", "nitrovault/owner/issuer.py",
                "nitrovault/eif.py", "nitrovault/client.py", "nitrovault/watermark/weights.py",
                "nitrovault/image.py", "enclave_app/Dockerfile"):
        assert (REPO / rel).is_file() and rel not in listed, rel
    assert not any(rel.startswith("nitrovault/policy/") for rel in listed)


@pytest.fixture
def pruned(tmp_path: Path) -> Path:
    for package in image.IMAGE_PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "nitrovault" / "stray.py").write_text("X = 1\n")
    assert image.main(["prune", str(tmp_path)]) == 0
    return tmp_path


def test_prune_leaves_exactly_the_list(pruned: Path) -> None:
    files = sorted(p.relative_to(pruned).as_posix() for p in pruned.rglob("*") if p.is_file())
    assert files == [rel for rel, _ in image.image_files(REPO)]
    assert not (pruned / "nitrovault" / "local").exists() and not (pruned / "nitrovault" / "cli").exists()
    assert image.main(["check", str(pruned)]) == 0


def test_the_enclave_imports_with_only_the_image_present(pruned: Path) -> None:
    probe = (
        "import importlib, pkgutil, sys, enclave_app, nitrovault\n"
        f"assert nitrovault.__file__.startswith({str(pruned)!r}), nitrovault.__file__\n"
        "for m in pkgutil.walk_packages(enclave_app.__path__, 'enclave_app.'):\n"
        "    if not m.name.endswith('__main__'):\n"
        "        importlib.import_module(m.name)\n"
        "print(len([k for k in sys.modules if k.startswith(('nitrovault', 'enclave_app'))]))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=pruned, env={"PYTHONPATH": str(pruned)},
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) > 40


def test_check_fails_on_an_unlisted_file(pruned: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (pruned / "nitrovault" / "cli").mkdir()
    (pruned / "nitrovault" / "cli" / "__init__.py").write_text("")
    assert image.main(["check", str(pruned)]) == 1
    assert "nitrovault/cli/__init__.py" in capsys.readouterr().err


def test_a_listed_file_missing_fails_the_build(pruned: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (pruned / "nitrovault" / "receipts.py").unlink()
    assert image.main(["check", str(pruned)]) == 1
    assert "nitrovault/receipts.py is on the image allowlist" in capsys.readouterr().err


# -- purity ------------------------------------------------------------------------------------------------


def impure_imports(modules: set[str]) -> dict[str, set[str]]:
    """For each of ``modules`` (and what of ours it imports), the forbidden top-level imports it makes."""
    found: dict[str, set[str]] = {}
    for name in closure(modules, leaves=ADAPTERS):
        path = MODULES[name]
        imported = imports_of(name, path.read_text(), is_package=path.name == "__init__.py")
        bad = {dotted.split(".")[0] for dotted in imported} & FORBIDDEN
        if bad:
            found[name] = bad
    return found


def test_the_pure_packages_import_no_network_process_aws_grpc_or_torch() -> None:
    pure = {m for m in MODULES if m.startswith(PURE) and m not in ADAPTERS}
    assert impure_imports(pure) == {}


def test_the_purity_check_can_fail() -> None:
    source = "import torch\nfrom ..kms import client\nif TYPE_CHECKING:\n    import grpc\n"
    assert imports_of("nitrovault.watermark.x", source, is_package=False) == {
        "torch", "nitrovault.kms", "nitrovault.kms.client"}
    assert impure_imports({"nitrovault.kms.client"})  # boto3 and botocore: the KMS client is not pure
