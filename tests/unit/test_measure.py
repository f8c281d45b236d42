"""Local PCR measurement: AWS's PCR3/PCR4 worked examples; PCR0/1/2 react to exactly the right edits."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

import nitrovault.image as image_module
from nitrovault.errors import ConfigError
from nitrovault.local.measure import (
    EnclaveMeasurement,
    default_lock_file,
    measure_enclave,
    measured_files,
    pcr3_for_role,
    pcr4_for_instance,
    pcr_of,
)

REPO = Path(__file__).resolve().parents[2]


def test_pcr3_matches_aws_worked_example() -> None:
    assert pcr3_for_role("arn:aws:iam::123456789012:role/Webserver").hex() == (
        "78fce75db17cd4e0a3fb8dad3ad128ca5e77edbb2b2c7f75329dccd99aa5f6ef4fc1f1a452e315b9e98f9e312e6921e6"
    )


def test_pcr4_matches_aws_worked_example() -> None:
    assert pcr4_for_instance("i-1234567890abcdef0").hex() == (
        "08f996b5d43e047a9eb51e7f548bfee7e164fd7dc8f65541f2ac09d6545ac812719327281c401a67a10fcba87ae79ce0"
    )


def test_pcr_of_is_an_extend_of_a_zero_register() -> None:
    digest = hashlib.sha384(b"stream").digest()
    assert pcr_of(digest) == hashlib.sha384(b"\x00" * 48 + digest).digest()


def _copy_tree(dst: Path) -> Path:
    """A copy of the two measured packages (plus a lock file) of this checkout."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("enclave_app", "nitrovault"):
        shutil.copytree(REPO / package, dst / package, ignore=ignore)
    (dst / "requirements").mkdir()
    (dst / "requirements" / "lock.txt").write_text("cbor2==6.3.0\ncryptography==50.0.2\n")
    return dst


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return _copy_tree(tmp_path / "tree")


def measure(root: Path) -> EnclaveMeasurement:
    return measure_enclave(root, default_lock_file(root))


def test_measuring_this_checkout_gives_three_48_byte_pcrs() -> None:
    m = measure(REPO)
    assert set(m.as_pcrs()) == {0, 1, 2}
    assert all(len(v) == 48 for v in m.as_pcrs().values())
    assert len({m.pcr0, m.pcr1, m.pcr2}) == 3
    assert m == measure(REPO)  # deterministic


def test_editing_one_line_changes_pcr0_and_pcr2_only(tree: Path) -> None:
    before = measure(tree)
    target = tree / "nitrovault" / "errors.py"
    target.write_text(target.read_text().replace("class ConfigError(", "class ConfigError(  ", 1))
    after = measure(tree)
    assert after.pcr1 == before.pcr1
    assert after.pcr0 != before.pcr0 and after.pcr2 != before.pcr2


def test_editing_enclave_app_changes_pcr2(tree: Path) -> None:
    before = measure(tree)
    (tree / "enclave_app" / "__init__.py").write_text("# edited\n", encoding="utf-8")
    assert measure(tree).pcr2 != before.pcr2


def test_changing_the_lock_file_changes_pcr0_and_pcr2(tree: Path) -> None:
    before = measure(tree)
    (tree / "requirements" / "lock.txt").write_text("cbor2==6.3.1\ncryptography==50.0.2\n")
    after = measure(tree)
    assert after.pcr1 == before.pcr1 and after.pcr2 != before.pcr2 and after.pcr0 != before.pcr0


def test_enclave_lock_is_preferred_over_lock_txt(tree: Path) -> None:
    assert default_lock_file(tree) == tree / "requirements" / "lock.txt"
    (tree / "requirements" / "enclave.lock").write_text("only-this==1\n")
    assert default_lock_file(tree) == tree / "requirements" / "enclave.lock"


def test_missing_lock_is_measured_as_a_distinct_marker(tree: Path) -> None:
    with_lock = measure(tree)
    (tree / "requirements" / "lock.txt").unlink()
    no_lock = measure_enclave(tree, None)
    assert not no_lock.lock_file_measured and with_lock.lock_file_measured
    assert no_lock.pcr2 != with_lock.pcr2
    empty = tree / "empty.lock"
    empty.write_bytes(b"")
    assert measure_enclave(tree, empty).pcr2 != no_lock.pcr2
    assert measure_enclave(tree, tree / "does-not-exist.lock") == no_lock


def test_caches_and_local_stand_ins_are_not_measured(tree: Path) -> None:
    before = measure(tree)
    cache = tree / "nitrovault" / "__pycache__"
    cache.mkdir(exist_ok=True)
    (cache / "errors.cpython-311.pyc").write_bytes(b"\x00junk")
    (tree / "enclave_app" / "stray.pyc").write_bytes(b"\x00junk")
    (tree / "nitrovault" / "local" / "extra.py").write_text("X = 1\n")
    assert measure(tree) == before
    rels = [rel for rel, _ in measured_files(tree)]
    unwanted = [r for r in rels if "__pycache__" in r or r.endswith(".pyc")]
    unwanted += [r for r in rels if r.startswith("nitrovault/local/")]
    assert unwanted == []
    assert "nitrovault/nsm.py" in rels and "nitrovault/data/aws_nitro_enclaves_root_g1.pem" in rels


def test_non_python_files_in_image_packages_are_measured(tree: Path) -> None:
    before = measure(tree)
    (tree / "nitrovault" / "envelope" / "extra.json").write_text("{}")
    assert measure(tree).pcr2 != before.pcr2


def test_only_the_image_allowlist_is_measured(tree: Path) -> None:
    """What the Dockerfile removes is not measured either: the owner's tools change no PCR."""
    before = measure(tree)
    (tree / "nitrovault" / "data" / "extra.json").write_text("{}")
    for rel in ("nitrovault/cli/token_cmd.py", "nitrovault/owner/issuer.py", "nitrovault/eif.py",
                "nitrovault/watermark/weights.py", "nitrovault/client.py"):
        (tree / rel).write_text((tree / rel).read_text() + "\n# edited\n")
    assert measure(tree) == before
    rels = {rel for rel, _ in measured_files(tree)}
    assert not any(r.startswith(("nitrovault/cli/", "nitrovault/owner/", "nitrovault/policy/")) for r in rels)


def _write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def test_file_order_on_disk_does_not_matter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = {f"enclave_app/m{i:02d}.py": f"X = {i}\n".encode() for i in range(30)}
    files |= {"enclave_app/__init__.py": b"", "enclave_app/sub/a.py": b"A", "nitrovault/envelope/b.py": b"B"}
    root = _write_tree(tmp_path / "t", files)
    normal = measure_enclave(root, None)
    seen: list[list[str]] = []
    real_walk = os.walk

    def reversed_walk(top: Path, **kw: bool) -> Iterator[tuple[str, list[str], list[str]]]:
        # Same lists (so pruning still works), opposite directory-entry order.
        for dirpath, dirnames, filenames in real_walk(top, **kw):
            dirnames.reverse()
            filenames.reverse()
            seen.append(list(filenames))
            yield dirpath, dirnames, filenames

    monkeypatch.setattr(image_module.os, "walk", reversed_walk)
    assert measure_enclave(root, None) == normal
    assert any(names != sorted(names) for names in seen)  # the order really did differ


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ({"enclave_app/ab": b"c"}, {"enclave_app/a": b"bc"}),  # boundary between path and content
        ({"enclave_app/x": b"12"}, {"enclave_app/x": b"1", "enclave_app/y": b"2"}),
        ({"enclave_app/x": b""}, {"enclave_app/x.py": b""}),
        ({"nitrovault/envelope/x": b"1"}, {"enclave_app/x": b"1", "nitrovault/__init__.py": b""}),
    ],
)
def test_length_prefixing_keeps_different_trees_apart(
    tmp_path: Path, a: dict[str, bytes], b: dict[str, bytes]
) -> None:
    assert (
        measure_enclave(_write_tree(tmp_path / "a", a), None).pcr2
        != measure_enclave(_write_tree(tmp_path / "b", b), None).pcr2
    )


def test_a_directory_without_the_packages_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        measure_enclave(tmp_path, None)
    with pytest.raises(ConfigError):
        measure_enclave(tmp_path / "missing", None)
