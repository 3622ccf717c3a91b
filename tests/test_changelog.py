"""CHANGELOG.md in the Keep a Changelog format, and the version it names the one pdp reports.

The version lives in pyproject.toml; ``pdp --version`` (and ``python -m pdp --version``) must print it,
and the newest release in the changelog must be it, so that a release cannot go out with one of the
three saying something else.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
CHANGELOG = (ROOT / "CHANGELOG.md").read_text("utf-8")
#: The kinds of change Keep a Changelog 1.1.0 groups a release's entries by.
KINDS = {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}
RELEASE = re.compile(r"## \[(\d+)\.(\d+)\.(\d+)\] - (\d{4}-\d{2}-\d{2})")


def sections() -> list[tuple[str, str]]:
    """(heading, body) of each ``## `` section, in order."""
    parts = re.split(r"^(## .*)$", CHANGELOG, flags=re.M)
    return [(parts[i], parts[i + 1]) for i in range(1, len(parts), 2)]


def test_pdp_version_prints_the_version_of_pyproject() -> None:
    script = str(Path(sys.executable).parent / "pdp")
    for command in ([script, "--version"], [sys.executable, "-m", "pdp", "--version"]):
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"pdp {VERSION}"


def test_the_changelog_opens_with_unreleased_then_releases_newest_first() -> None:
    headings = [h for h, _ in sections()]
    assert headings[0] == "## [Unreleased]"
    releases = [RELEASE.fullmatch(h) for h in headings[1:]]
    assert releases and all(releases), [h for h, m in zip(headings[1:], releases, strict=True) if not m]
    versions = [tuple(int(m.group(i)) for i in (1, 2, 3)) for m in releases if m]
    dates = [date.fromisoformat(m.group(4)) for m in releases if m]
    assert versions == sorted(versions, reverse=True) and len(set(versions)) == len(versions)
    assert dates == sorted(dates, reverse=True)


def test_the_newest_release_is_the_version_pdp_reports() -> None:
    newest = next(RELEASE.fullmatch(h) for h, _ in sections() if RELEASE.fullmatch(h))
    assert newest is not None and ".".join(newest.group(1, 2, 3)) == VERSION


def test_every_section_groups_its_entries_by_kind_of_change() -> None:
    for heading, body in sections():
        kinds = re.findall(r"^### (.*)$", body, flags=re.M)
        assert kinds, f"{heading} has no entries"
        assert set(kinds) <= KINDS and len(kinds) == len(set(kinds)), f"{heading}: {kinds}"
        for kind_body in re.split(r"^### .*$", body, flags=re.M)[1:]:
            assert re.search(r"^- \S", kind_body, flags=re.M), f"{heading}: an empty group"
