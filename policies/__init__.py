"""The Rego policies pdp ships: the default zero-trust policy, its data document and its tests."""

from __future__ import annotations

from pathlib import Path

#: The folder holding the shipped policy; the default for ``policy.paths``.
DEFAULT_POLICY_DIR = Path(__file__).resolve().parent
