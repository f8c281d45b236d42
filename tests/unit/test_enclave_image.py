"""The enclave image recipe (enclave_app/Dockerfile) and its lock file, checked as text: there is no
docker engine here, so these properties are what a reviewer (and CI) can hold the recipe to."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "enclave_app" / "Dockerfile"
LOCK = REPO / "requirements" / "enclave.txt"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and continuation lines joined."""
    kept = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    joined = re.sub(r"\\\n", " ", kept)
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def check(text: str) -> list[str]:
    """Every property the recipe must have; returns the violations."""
    ins = instructions(text)
    problems = []
    base_arg = next((v.split("=", 1)[1] for k, v in ins if k == "ARG" and v.startswith("BASE=")), None)
    for kind, value in ins:
        if kind != "FROM":
            continue
        image = value.split()[0]
        if image == "${BASE}" and base_arg is not None:
            image = base_arg
        if not re.fullmatch(r"[\w./:-]+@sha256:[0-9a-f]{64}", image):
            problems.append(f"FROM not pinned by digest: {value}")
    runs = " ".join(v for k, v in ins if k == "RUN")
    pip = [v for k, v in ins if k == "RUN" and "pip install" in v]
    if not pip or not all("--require-hashes" in v and "--no-deps" in v for v in pip):
        problems.append("pip install without --require-hashes --no-deps")
    if not any("-r /tmp/enclave.txt" in v for v in pip):
        problems.append("requirements/enclave.txt is not what is installed")
    final = text.split("\nFROM ")[-1]  # the last stage is the image
    final_ins = instructions("FROM " + final)
    for kind, value in final_ins:
        if kind in ("COPY", "ADD") and "nitrovault/local" in value:
            problems.append(f"nitrovault/local copied into the image: {value}")
        if (
            kind in ("COPY", "ADD")
            and "--from=" not in value
            and re.search(r"(^|\s)(\.|nitrovault/?)\s", value)
        ):
            problems.append(f"source tree copied into the final stage, not from the filtered stage: {value}")
    if "python /image.py prune /src" not in runs:
        problems.append("the source stage is not pruned to the image allowlist")
    if "python /image.py check /src" not in runs:
        problems.append("the pruned source stage is not checked against the image allowlist")
    if not any(k == "COPY" and v.endswith("/etc/nitrovault/enclave.json") for k, v in final_ins):
        problems.append("the measured config is not copied to /etc/nitrovault/enclave.json")
    entry = [v for k, v in final_ins if k == "ENTRYPOINT"]
    if entry != ['["python", "-m", "enclave_app", "/etc/nitrovault/enclave.json"]']:
        problems.append(f"unexpected ENTRYPOINT {entry}")
    return problems


def test_dockerfile_has_every_property() -> None:
    assert check(DOCKERFILE.read_text()) == []


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ("@sha256:", ":latest#", "not pinned by digest"),
        ("--require-hashes ", "", "--require-hashes"),
        (
            "COPY --from=source /src/nitrovault /opt/nitrovault/nitrovault",
            "COPY nitrovault/local /opt/nitrovault/nitrovault/local",
            "nitrovault/local copied",
        ),
        ("python /image.py prune /src", "python /image.py list /src", "not pruned"),
        ("python /image.py check /src", "python /image.py list /src", "not checked"),
        (
            "COPY --from=source /src/nitrovault /opt/nitrovault/nitrovault",
            "COPY nitrovault/ /opt/nitrovault/nitrovault",
            "source tree copied",
        ),
        (
            "COPY --from=config enclave.json /etc/nitrovault/enclave.json",
            "COPY --from=config enclave.json /etc/enclave.json",
            "/etc/nitrovault/enclave.json",
        ),
        ('"/etc/nitrovault/enclave.json"]', '"/tmp/enclave.json"]', "ENTRYPOINT"),
    ],
    ids=["tag", "no-hashes", "copies-local", "not-pruned", "not-checked", "copies-unfiltered", "config-path",
         "entrypoint"],
)
def test_each_property_check_can_fail(old: str, new: str, problem: str) -> None:
    text = DOCKERFILE.read_text()
    assert old in text
    problems = check(text.replace(old, new))
    assert any(problem in p for p in problems), problems


def test_lock_file_is_fully_hashed_and_torch_is_the_cpu_build() -> None:
    text = LOCK.read_text()
    entries = re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)((?:\s+\\\n\s+--hash=sha256:[0-9a-f]{64})+)", text, re.M)
    pins = {name.lower(): version for name, version, _ in entries}
    assert len(pins) == len(re.findall(r"^[A-Za-z0-9_.\-]+==", text, re.M))  # every pin has hashes
    assert pins["torch"] == "2.13.0+cpu"
    for name in ("cryptography", "cbor2", "grpcio", "boto3", "numpy", "asn1crypto"):
        assert name in pins
    assert "--find-links" not in text and "file:///" not in text  # nothing machine-local leaks into it


def test_lock_pins_match_the_tested_lock() -> None:
    tested = {}
    for line in (REPO / "requirements" / "lock.txt").read_text().splitlines():
        name, _, version = line.partition("==")
        tested[name.lower().replace("_", "-")] = version
    for name, version in re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", LOCK.read_text(), re.M):
        key = name.lower().replace("_", "-")
        if key in tested:
            assert tested[key] == version, name
