"""The coverage-guided fuzz targets in ``fuzz/``, each run briefly: a crash is a failure.

Each target runs in its own process (atheris/libFuzzer, as ``scripts/fuzz`` runs them for longer),
from its seeds, with a fixed mutation seed and a bounded time; two run at a time. A failure shows the
target's report and the input that broke it, and says how to run that input again.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parents[1] / "fuzz"
TARGETS = sorted(p.stem.removeprefix("fuzz_") for p in FUZZ.glob("fuzz_*.py"))
#: Seconds of fuzzing per target once its seeds are in (start-up, about a second, comes on top).
SECONDS = 2


@dataclass(frozen=True)
class Run:
    returncode: int
    stderr: str
    artifacts: tuple[Path, ...]


def _run(target: str, folder: Path) -> Run:
    artifacts = folder / "artifacts"
    artifacts.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "PDP_FUZZ_KEEP_GOING"}
    command = [sys.executable, str(FUZZ / f"fuzz_{target}.py"), f"-max_total_time={SECONDS}", "-seed=1",
               "-timeout=20", "-print_final_stats=1", f"-artifact_prefix={artifacts}/", str(folder / "corpus")]
    result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=300, check=False)
    return Run(result.returncode, result.stderr, tuple(sorted(artifacts.iterdir())))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    try:
        import atheris  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("atheris is not installed (pip install -e '.[test]')")
        pytest.skip("atheris is not installed")
    with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        futures = {t: pool.submit(_run, t, tmp_path_factory.mktemp(f"fuzz_{t}")) for t in TARGETS}
        return {t: f.result() for t, f in futures.items()}


def test_every_parser_of_attacker_bytes_has_a_target() -> None:
    assert set(TARGETS) >= {"xfcc", "rfc9440", "nginx", "traefik", "alb", "pem", "der", "jws", "dpop",
                            "json_check", "envoy_grpc", "pipeline"}


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_target_finds_nothing(target: str, runs: dict[str, Run]) -> None:
    run = runs[target]
    if run.returncode != 0 or run.artifacts:
        report = "\n".join(run.stderr.splitlines()[-40:])
        inputs = "\n".join(f"{p.name}: {p.read_bytes()[:2000]!r}" for p in run.artifacts)
        again = run.artifacts[0] if run.artifacts else ""
        pytest.fail(f"fuzz_{target} failed (exit {run.returncode}):\n{report}\n\ninput(s):\n{inputs}\n\n"
                    f"run it again: python fuzz/fuzz_{target}.py {again}", pytrace=False)
    assert "stat::number_of_executed_units" in run.stderr
