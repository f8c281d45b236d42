"""``--at``: one parser for every command, with one rule for a time without an offset (refused)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from nitrovault.cli import app
from nitrovault.cli.times import parse_at


@pytest.mark.parametrize(("text", "expected"), [
    ("2024-09-07T14:37:39.545Z", datetime(2024, 9, 7, 14, 37, 39, 545000, tzinfo=UTC)),
    ("2025-06-01T12:00:00+02:00", datetime(2025, 6, 1, 10, 0, tzinfo=UTC)),
    ("@0", datetime(1970, 1, 1, tzinfo=UTC)),
    ("@1725719859.5", datetime(2024, 9, 7, 14, 37, 39, 500000, tzinfo=UTC)),
])
def test_accepted_forms(text: str, expected: datetime) -> None:
    at = parse_at(text)
    assert at == expected and at.utcoffset() is not None


def test_an_offset_is_kept() -> None:
    assert parse_at("2025-06-01T12:00:00+02:00").tzinfo == timezone(timedelta(hours=2))


@pytest.mark.parametrize(("text", "message"), [
    ("2025-06-01T10:00:00", "no UTC offset"),
    ("yesterday", "not an ISO 8601 time"),
    ("@", "not a number of seconds"),
    ("@soon", "not a number of seconds"),
    ("@nan", "not a number of seconds"),
    ("@1e300", "not a number of seconds"),
])
def test_refused_forms_name_the_option(text: str, message: str) -> None:
    with pytest.raises(typer.BadParameter) as refused:
        parse_at(text)
    assert message in str(refused.value) and refused.value.param_hint == "--at"


@pytest.mark.parametrize("command", [
    ["attest", "verify", "{f}"],
    ["receipt", "verify", "{f}", "--attestation", "{f}"],
    ["audit", "verify", "{f}", "--attestation", "{f}"],
])
def test_every_command_refuses_a_time_without_offset(command: list[str], tmp_path: Path) -> None:
    existing = tmp_path / "file"
    existing.write_bytes(b"x")
    args = [part.format(f=existing) for part in command]
    result = CliRunner().invoke(app, [*args, "--at", "2025-06-01T10:00:00"])
    assert result.exit_code == 2 and "no UTC offset" in result.output, result.output
