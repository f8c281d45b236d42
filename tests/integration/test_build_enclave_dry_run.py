"""scripts/build_enclave.sh --dry-run: the exact commands it would run, in order, and its usage errors.

docker and nitro-cli cannot run here (no engine, no Nitro host); the dry run is what reviewers and this
test can check.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "build_enclave.sh"


def sealed_args(tmp_path: Path) -> list[str]:
    sealed = tmp_path / "model.sealed"
    sealed.write_bytes(b"NVSEALED")  # a dry run only names it
    return ["--sealed-model", str(sealed)]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60, check=False
    )


def commands(stdout: str) -> list[list[str]]:
    return [
        shlex.split(line[2:])
        for line in stdout.splitlines()
        if line.startswith("+ ") and "(" not in line and "=" not in line.split()[1]
    ]


def test_dry_run_prints_docker_nitro_cli_and_manifest_steps(tmp_path: Path) -> None:
    config = tmp_path / "enclave.json"
    config.write_text("{}")
    out = tmp_path / "out"
    result = run(
        "--config",
        str(config),
        *sealed_args(tmp_path),
        "--out-dir",
        str(out),
        "--tag",
        "nv:test",
        "--built-at",
        "2025-01-01T00:00:00Z",
        "--dry-run",
    )
    assert result.returncode == 0, result.stderr
    cmds = commands(result.stdout)
    tools = [c[0] for c in cmds]
    completion = next(i for i, c in enumerate(cmds) if "enclave_config.py" in " ".join(c))
    assert cmds[completion][cmds[completion].index("--output") + 1] == f"{out}/config-context/enclave.json"
    assert cmds[completion][cmds[completion].index("--sealed-model") + 1] == str(tmp_path / "model.sealed")
    assert (
        completion < tools.index("docker")
        < tools.index("nitro-cli")
        < next(i for i, c in enumerate(cmds) if "pcr_manifest.py" in " ".join(c))
    )
    docker = next(c for c in cmds if c[0] == "docker")
    assert docker[:2] == ["docker", "build"] and f"config={out}/config-context" in docker
    assert docker[docker.index("--file") + 1] == str(REPO / "enclave_app" / "Dockerfile")
    nitro = next(c for c in cmds if c[0] == "nitro-cli")
    assert nitro == [
        "nitro-cli",
        "build-enclave",
        "--docker-uri",
        "nv:test",
        "--output-file",
        f"{out}/enclave.eif",
    ]
    manifest = next(c for c in cmds if "pcr_manifest.py" in " ".join(c))
    assert manifest[manifest.index("--eif") + 1] == f"{out}/enclave.eif"
    assert manifest[manifest.index("--built-at") + 1] == "2025-01-01T00:00:00Z"
    assert "--nitro-cli-json" in manifest
    assert not out.exists()  # a dry run creates nothing


def test_dry_run_signs_for_pcr8_when_given_a_certificate(tmp_path: Path) -> None:
    config = tmp_path / "enclave.json"
    config.write_text("{}")
    result = run(
        "--config", str(config), *sealed_args(tmp_path), "--signing-certificate", "c.pem", "--private-key",
        "k.pem", "--dry-run"
    )
    assert result.returncode == 0, result.stderr
    nitro = next(c for c in commands(result.stdout) if c[0] == "nitro-cli")
    assert nitro[-4:] == ["--signing-certificate", "c.pem", "--private-key", "k.pem"]


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert run("--dry-run").returncode == 2  # no --config
    assert run("--config", str(tmp_path / "missing.json"), "--dry-run").returncode == 2
    config = tmp_path / "enclave.json"
    config.write_text("{}")
    assert run("--config", str(config), "--dry-run").returncode == 2  # no --sealed-model
    assert run("--config", str(config), "--sealed-model", str(tmp_path / "none"), "--dry-run").returncode == 2
    assert run("--config", str(config), *sealed_args(tmp_path), "--signing-certificate", "c.pem",
               "--dry-run").returncode == 2
    assert run("--config", str(config), "--bogus").returncode == 2
