"""The README's commands for ``pdp dev token``, ``pdp dev proof`` and ``pdp check --input/--explain``, run as
written on a ``pdp dev init dev`` setup, and every option the README lists for them known to the parser."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pdp.devinit import dev_init

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent


def section(title: str) -> str:
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def sh_blocks(text: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)\n```", text, re.DOTALL)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A folder holding ``dev`` (the quick start's ``pdp dev init dev``) and ``.venv/bin`` (this venv)."""
    dev_init(tmp_path / "dev")
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "bin").symlink_to(BIN)
    return tmp_path


def run(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
                          check=False)


def test_the_quick_start_dev_token_command_is_denied_with_the_scope_named(workdir):
    (block,) = [b for b in sh_blocks(section("Quick start")) if "pdp dev init dev" in b]
    (command,) = [line for line in block.splitlines() if "pdp dev token" in line]
    result = run(command, workdir)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.startswith("DENY 403 insufficient_scope")
    assert 'error="insufficient_scope"' in result.stdout and 'scope="write"' in result.stdout


def test_the_dpop_section_commands_are_allowed(workdir):
    (block,) = [b for b in sh_blocks(section("DPoP (RFC 9449)")) if "pdp dev proof" in b]
    result = run(block, workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ALLOW 200 allowed")
    assert "token bound to the DPoP key" in result.stdout
    assert oct((workdir / "dev" / "dpop.jwk").stat().st_mode & 0o777) == "0o600"


def _options(command: list[str]) -> set[str]:
    """The options ``pdp COMMAND -h`` lists."""
    result = subprocess.run([str(BIN / "pdp"), *command, "-h"], capture_output=True, text=True, timeout=60,
                            check=True)
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", result.stdout))


@pytest.mark.parametrize("command", [["dev", "token"], ["dev", "proof"], ["check"]])
def test_every_option_the_other_commands_list_gives_exists(command):
    text = section("Other commands")
    prefix = "- `pdp " + " ".join(command)
    items = [item for item in text.split("\n- ") if ("- " + item).startswith(prefix)]
    assert items, prefix
    listed = {o for item in items for o in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", item)}
    assert listed, items
    assert listed <= _options(command), listed - _options(command)


def test_the_quick_start_dev_token_command_is_the_one_dev_init_prints(workdir):
    (block,) = [b for b in sh_blocks(section("Quick start")) if "pdp dev init dev" in b]
    (readme,) = [line for line in block.splitlines() if "pdp dev token" in line]
    init = run(".venv/bin/pdp dev init dev --force", workdir)
    (printed,) = [line.strip() for line in init.stdout.splitlines() if " dev token --dir " in line]
    # the same command, but for --dir dev, which is the default
    assert printed.replace(" --dir dev", "") == readme.replace(".venv/bin/pdp", printed.split()[0])
