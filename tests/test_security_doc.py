"""SECURITY.md backs each claim with a test: every test it names must exist, so a claim cannot outlive
the test that held it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_CITED = re.compile(r"`(test_\w+\.py)(?:::([\w.]+))?`")


def _defined(test_file: Path, name: str) -> bool:
    text = test_file.read_text("utf-8")
    last = name.rsplit(".", 1)[-1]
    return re.search(rf"^\s*(?:async )?def {re.escape(last)}\(", text, re.MULTILINE) is not None or (
        "." not in name and re.search(rf"^class {re.escape(name)}\b", text, re.MULTILINE) is not None)


def test_every_test_security_md_names_exists() -> None:
    doc = (ROOT / "SECURITY.md").read_text("utf-8")
    cited = _CITED.findall(doc)
    assert len(cited) > 30
    missing = []
    for file_name, name in cited:
        path = ROOT / "tests" / file_name
        if not path.is_file() or (name and not _defined(path, name)):
            missing.append(f"{file_name}::{name}" if name else file_name)
    assert not missing, f"SECURITY.md names tests that do not exist: {missing}"


def test_every_bare_test_name_security_md_names_exists() -> None:
    """Names like `ProxyContract.test_…` (a test every real-proxy module runs) live in tests/proxies.py."""
    doc = (ROOT / "SECURITY.md").read_text("utf-8")
    for cls, name in re.findall(r"`(\w+)\.(test_\w+)`", doc):
        text = "".join(p.read_text("utf-8") for p in (ROOT / "tests").glob("*.py"))
        assert re.search(rf"^class {cls}\b", text, re.MULTILINE), cls
        assert re.search(rf"def {name}\(", text), name
