"""pdp: a zero-trust policy decision point.

It verifies the client certificate, the OAuth 2.0 access token and the
RFC 8705 binding between them, evaluates a Rego policy on all of it, and
answers allow or deny with a reason code, an explanation and a decision id.

Build one from a config file and ask it::

    from pdp import CheckRequest, build_pdp, load_config

    pdp = build_pdp(load_config(Path("pdp.toml")))
    decision = pdp.decide(CheckRequest(method="GET", path="/orders", time=time.time(), ...))
"""

from __future__ import annotations

from pdp.assemble import build_pdp
from pdp.certificates.identity import CertIdentity
from pdp.config import Config, load_config
from pdp.credentials.tokens import VerifiedToken
from pdp.decision import Decision, Step
from pdp.errors import ConfigError, Denied, LoadError, PdpError
from pdp.pipeline import DecisionSettings, Pdp
from pdp.reasons import Reason
from pdp.request import CheckRequest

__all__ = [
    "CertIdentity",
    "CheckRequest",
    "Config",
    "ConfigError",
    "Decision",
    "DecisionSettings",
    "Denied",
    "LoadError",
    "Pdp",
    "PdpError",
    "Reason",
    "Step",
    "VerifiedToken",
    "build_pdp",
    "load_config",
]

__version__ = "0.1.0"
