"""`powerq flower`: credentials and address, without starting Flower (its exec is caught)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from scheduler.cli import main


class _Exec(Exception):
    pass


def _run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **env: str) -> tuple[Any, dict[str, Any]]:
    seen: dict[str, Any] = {}

    def fake_exec(file: str, argv: list[str], environ: dict[str, str]) -> None:
        seen.update(argv=argv, env=environ)
        raise _Exec

    monkeypatch.setattr(os, "execvpe", fake_exec)
    base = {"POWERQ_SECRET_KEY_FILE": str(tmp_path / "cfg" / "secret.key"),
            "POWERQ_REDIS_URL": "redis://127.0.0.1:1/0"}
    result = CliRunner().invoke(main, ["flower"], env={**base, **env})
    assert isinstance(result.exception, _Exec), result.output
    return result, seen


def test_generated_flower_password_is_kept_in_a_private_file_not_printed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("POWERQ_FLOWER_BASIC_AUTH", raising=False)
    result, seen = _run(monkeypatch, tmp_path, POWERQ_FLOWER_BASIC_AUTH="")
    auth = seen["env"]["FLOWER_BASIC_AUTH"]
    user, password = auth.split(":", 1)
    assert user == "admin" and len(password) >= 16
    assert password not in result.output
    path = tmp_path / "cfg" / "flower.auth"
    assert str(path) in result.output
    assert path.read_text().strip() == auth
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "--address=127.0.0.1" in seen["argv"]  # loopback unless configured otherwise
    assert not any(password in a for a in seen["argv"])  # not on the command line (ps)
    assert seen["env"]["FLOWER_UNAUTHENTICATED_API"] == "false"
    again, seen_again = _run(monkeypatch, tmp_path, POWERQ_FLOWER_BASIC_AUTH="")
    assert seen_again["env"]["FLOWER_BASIC_AUTH"] == auth  # the same one next time
    assert password not in again.output


def test_configured_flower_password_is_used_and_not_printed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    result, seen = _run(monkeypatch, tmp_path, POWERQ_FLOWER_BASIC_AUTH="ops:Fl0wer-Secret-1")
    assert seen["env"]["FLOWER_BASIC_AUTH"] == "ops:Fl0wer-Secret-1"
    assert "Fl0wer-Secret-1" not in result.output
    assert not (tmp_path / "cfg" / "flower.auth").exists()
