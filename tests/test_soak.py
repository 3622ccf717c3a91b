"""A bounded soak of ``pdp serve``: gRPC and HTTP together, a realistic mix, memory and descriptors flat.

One ``pdp serve --workers 1`` on a ``pdp dev init`` folder, driven from both transports for
``PDP_SOAK_SECONDS`` (16 by default; set it to 120 or more for a longer run by hand). Every answer must be
the intended allow or deny with its reason code, the server's own counts and decision log must agree with
what the callers got, and after the warm-up its resident memory must stay flat and its open descriptors
must not grow. The figures are printed as one line; nothing here judges speed.
"""

from __future__ import annotations

import pytest
import soak
from servers import free_port

pytestmark = pytest.mark.integration

DEFAULT_SECONDS = 16.0


def test_a_soak_of_both_transports_answers_as_intended_with_memory_and_descriptors_flat(tmp_path, capsys):
    seconds = soak.soak_seconds(DEFAULT_SECONDS)
    folder = soak.dev_folder(tmp_path)
    config = soak.soak_config(folder)
    # New clients enough to fill every cache many times over; past the pool they come round again, long
    # evicted by then.
    material = soak.mint(folder, seconds=seconds,
                         new_clients=int(min(12_000, max(4 * soak.CACHE_SIZE, 200 * seconds))))
    server = soak.Server(config, free_port(), free_port(), tmp_path / "pdp.stderr")
    try:
        server.wait_ready()
        report = soak.run(server, material, seconds=seconds, max_requests=int(3000 * seconds), seed=9)
    finally:
        stderr = server.stop()
        print(f"pdp serve's standard error, the end of it:\n{stderr[-4000:]}")  # pytest shows it on a failure
    with capsys.disabled():
        print("\n" + report.summary())
    problems = report.problems()
    assert "Traceback" not in stderr, stderr[-4000:]
    assert not problems, "\n".join(problems)
