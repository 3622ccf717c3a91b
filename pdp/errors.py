"""The exceptions pdp raises.

::

    PdpError
    ├── Denied            a credential or request failed a check; carries a Reason
    ├── NeedsNetwork      decide(network=False) reached a step that must wait on the network
    └── ConfigError       the configuration is invalid; names the key (``tokens.issuers[0].jwks_url``)
        └── LoadError     a policy, data, trust-bundle or key file failed to load

``Denied`` never escapes ``Pdp.decide()``: the pipeline turns it into a deny
``Decision``; its ``detail`` goes to the explanation and the decision log, its
``reason`` decides what the caller sees. ``NeedsNetwork`` is the one exception
``decide()`` lets through.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pdp.reasons import Reason

if TYPE_CHECKING:
    from pdp.request import CheckRequest


class PdpError(Exception):
    """Base class of every pdp exception."""


class Denied(PdpError):
    """A check failed: the request is denied for ``reason``."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(f"{reason.code}: {detail}" if detail else reason.code)
        self.reason = reason
        self.detail = detail or reason.description


class NeedsNetwork(PdpError):
    """The decision needs a key-set fetch, and the caller asked for a decision without network waits.

    Adapters on an event loop decide inline with ``network=False`` and, on this
    exception, decide ``request`` (the request as read, set by ``Pdp.check``) again in a
    worker thread where waiting is harmless.
    """

    request: CheckRequest | None = None


class ConfigError(PdpError):
    """The configuration is invalid. ``key`` is the dotted path of the offending setting."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.message = message


class LoadError(ConfigError):
    """A file named by the configuration could not be loaded (policy, data, trust bundle, JWKS)."""
