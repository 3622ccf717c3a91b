"""The child process of ``pdp.policy.rego.probe_compile``: compile a regopy bundle read from stdin.

Exit 0 when it compiles, 1 with the engine's message when it does not; a
crash of the engine shows as a signal in the parent.
"""

from __future__ import annotations

import json
import sys

from pdp.errors import LoadError
from pdp.policy.engine import PolicyBundle
from pdp.policy.rego import RegopyEvaluator


def main() -> int:
    spec = json.loads(sys.stdin.buffer.read())
    bundle = PolicyBundle(tuple((n, s) for n, s in spec["modules"]), spec["data"], spec["entrypoint"], "regopy")
    try:
        RegopyEvaluator(bundle)
    except LoadError as exc:
        print(exc.message)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
