"""harness/required.py: a test's missing oracle package fails CI (env CI=true) and is skipped elsewhere;
and every test in tests/ goes through it rather than skipping on its own."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness import required

ABSENT = "likeness_no_such_package_d41d8"
TESTS = Path(__file__).resolve().parent


@pytest.mark.parametrize("value", ["true", "1", "TRUE", "yes"])
def test_a_missing_package_fails_in_ci(monkeypatch, value):
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match=f"{ABSENT} is not installed: the oracle's wheel"):
        required.module(ABSENT, "the oracle's wheel")
    with pytest.raises(pytest.fail.Exception, match="chromium is missing"):
        required.missing("chromium is missing")


@pytest.mark.parametrize("value", [None, "", "false", "0"])
def test_a_missing_package_is_skipped_outside_ci(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.skip.Exception, match=f"{ABSENT} is not installed"):
        required.module(ABSENT, "the oracle's wheel")
    with pytest.raises(pytest.skip.Exception):
        required.installed(ABSENT, "the oracle's wheel")


def test_an_installed_package_is_returned_in_and_outside_ci(monkeypatch):
    import json

    for value in ("true", "false"):
        monkeypatch.setenv("CI", value)
        assert required.module("json", "stdlib") is json
        assert required.module("email.mime", "stdlib").__name__ == "email.mime"
        assert required.installed("json", "stdlib").name == "json"


def test_a_package_that_is_there_but_breaks_is_an_error_not_a_skip(monkeypatch, tmp_path):
    (tmp_path / "likeness_broken_pkg.py").write_text("raise RuntimeError('broken on import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(RuntimeError, match="broken on import"):
        required.module("likeness_broken_pkg", "never")


def test_no_test_skips_on_a_missing_package_by_itself():
    """pytest.importorskip, or a skip beside a find_spec / ImportError check, would pass CI unproven."""
    offenders = []
    for path in sorted(TESTS.rglob("*.py")):
        if path.name in ("required.py", Path(__file__).name):
            continue
        text = path.read_text()
        if "importorskip" in text:
            offenders.append(f"{path.relative_to(TESTS)}: importorskip")
        for match in re.finditer(r"(find_spec|ImportError|ModuleNotFoundError|\.exists\(\))[^\n]*\n(?:[^\n]*\n){0,4}?"
                                 r"[^\n]*pytest\.skip\(", text):
            offenders.append(f"{path.relative_to(TESTS)}: {match.group(0).splitlines()[0].strip()}")
    assert not offenders, offenders
