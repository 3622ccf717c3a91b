"""pdp's configuration: one TOML file, validated at start-up with path-qualified errors.

Every key is known: a misspelt key is an error naming it
(``tokens.issuers[0].audience: unknown key (did you mean 'audiences'?)``), not
a silently ignored setting. Relative file paths are relative to the config
file's folder. Without a file, ``Config.defaults()`` runs the shipped policy
with no trust bundles and no issuers: every credential is refused until some
are configured.
"""

from __future__ import annotations

import difflib
import re
import tomllib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pdp.credentials.jws import ASYMMETRIC_ALGORITHMS
from pdp.errors import ConfigError

if TYPE_CHECKING:
    from pdp.adapters.introspection import IntrospectionClient
from pdp.certificates.spiffe import SpiffeIdError, parse_spiffe_id
from pdp.credentials.rfc9068 import PLAIN_REQUIRED_CLAIMS, PROFILE_REQUIRED_CLAIMS
from pdp.credentials.rfc9449 import DpopSettings
from pdp.credentials.shared_introspection import decode_secret
from pdp.pipeline import DecisionSettings, UpstreamHeaders
from pdp.policies import DEFAULT_POLICY_DIR
from pdp.policy.engine import ENGINES, REGO_VERSIONS, entrypoint_query
from pdp.service.brute_force import LockoutSettings
from pdp.service.listener_tls import ListenerTls, identity_key


@dataclass(frozen=True)
class ServerConfig:
    http: str = "127.0.0.1:8181"
    #: TLS for both listeners (and which gateways may call), or None for plain text on loopback.
    tls: ListenerTls | None = None
    #: Envoy ext_authz gRPC listener; "" turns it off.
    grpc: str = "127.0.0.1:9191"
    grpc_workers: int = 8
    #: Set for the processes of ``pdp serve --workers N``, which share the gRPC port.
    grpc_reuse_port: bool = False
    reload_interval: float = 2.0
    max_body_bytes: int = 1024 * 1024
    #: The admin endpoints (``/admin/revocations``, ``/admin/identities``): only on a mutual-TLS listener
    #: that admits named callers, and then only to ``admin_callers`` (required: never every gateway).
    admin: bool = False
    admin_callers: tuple[str, ...] = ()


@dataclass(frozen=True)
class PolicyConfig:
    engine: str = "regorus"
    paths: tuple[Path, ...] = (DEFAULT_POLICY_DIR,)
    data: tuple[Path, ...] = ()
    decision: str = "pdp/authz/result"
    #: Outcomes kept by the facts the policy reads (``pdp.policy.decision_cache``); 0 turns the cache off.
    decision_cache_size: int = 10_000
    #: A construct regorus evaluates otherwise than OPA (``pdp.policy.divergence``): "refuse" the policy or "warn".
    divergence: str = "refuse"
    #: The Rego version the modules are written in: "v1" (OPA 1.x) or "v0" (not yet migrated; regorus only).
    rego_version: str = "v1"
    #: A policy's own denies are allowed and logged as "would have been denied" (``pdp.policy.shadow``).
    dry_run: bool = False
    #: ``[policy.shadow]``: a second policy evaluated beside this one, never changing the answer.
    shadow: ShadowPolicyConfig | None = None
    #: ``[policy.opa]``: the OPA server that decides when ``engine = "opa"`` (``pdp.policy.opa_remote``).
    opa: OpaConfig | None = None
    #: A FileDescriptorSet: gRPC request bodies are read as its messages (``pdp.policy.grpc_body``).
    proto_descriptor: Path | None = None


@dataclass(frozen=True)
class OpaConfig:
    """``[policy.opa]``: a remote OPA server's REST Data API, asked for every decision."""

    url: str
    #: Seconds for one whole exchange (connect, send, the last byte of the answer); past it: denied.
    timeout: float = 0.5
    #: The bearer token for OPA's ``--authentication=token`` is read from this file (at start and on reload).
    token_file: Path | None = None
    #: The CA certificates that sign an https OPA server's certificate (default: the bundle requests ships).
    ca: Path | None = None
    max_answer_bytes: int = 1024 * 1024
    #: pdp's certificate and key (PEM) for OPA's ``--authentication=tls``: both or neither, https only.
    client_cert: Path | None = None
    client_key: Path | None = None
    #: At most this many connections to OPA at once (lent to decisions, or idle between them).
    max_connections: int = 16
    #: Seconds ``/readyz`` stays not ready after a decision whose answer pdp refused.
    unready_after_failure: float = 5.0


@dataclass(frozen=True)
class ShadowPolicyConfig:
    """``[policy.shadow]``: on the enforced policy's engine, with its own modules, data and entrypoint."""

    paths: tuple[Path, ...]
    data: tuple[Path, ...] = ()
    decision: str = "pdp/authz/result"
    rego_version: str = "v1"
    #: Seconds the shadow may take on one input (in its own process); past it the process is replaced.
    timeout: float = 1.0


@dataclass(frozen=True)
class TrustBundleConfig:
    name: str
    file: Path
    trust_domain: str | None = None
    intermediates: Path | None = None
    crls: tuple[Path, ...] = ()
    require_crl: bool = False
    #: "hard": a certificate whose revocation status cannot be had is denied; "soft": allowed, logged, counted.
    revocation: str = "hard"
    ocsp: bool = True
    crl_distribution_points: bool = True
    require_revocation: bool = False
    revocation_timeout: float = 2.0
    max_crl_bytes: int = 4 * 1024 * 1024


@dataclass(frozen=True)
class CertificatesConfig:
    trust_bundles: tuple[TrustBundleConfig, ...] = ()
    max_chain_depth: int = 4
    cache_size: int = 10_000


@dataclass(frozen=True)
class IssuerConfig:
    issuer: str
    audiences: tuple[str, ...]
    algorithms: tuple[str, ...]
    jwks_file: Path | None = None
    jwks_url: str | None = None
    discovery: bool = False
    accept_plain_jwt: bool = False
    required_claims: tuple[str, ...] = PROFILE_REQUIRED_CLAIMS
    jwks_timeout: float = 3.0
    jwks_refresh_interval: float = 300.0
    jwks_min_refresh_interval: float = 30.0
    #: Opaque tokens: the issuer's RFC 7662 endpoint, and how pdp authenticates there.
    introspection_endpoint: str | None = None
    introspection_auth: str = "client_secret_basic"
    introspection_client_id: str | None = None
    introspection_client_secret: str | None = None
    introspection_client_cert: Path | None = None
    introspection_client_key: Path | None = None
    introspection_ca: Path | None = None
    introspection_cache_ttl: float = 300.0
    introspection_negative_ttl: float = 10.0
    introspection_timeout: float = 3.0

    @property
    def opaque(self) -> bool:
        return self.introspection_endpoint is not None


@dataclass(frozen=True)
class TokensConfig:
    issuers: tuple[IssuerConfig, ...] = ()
    leeway: float = 30.0
    cache_size: int = 10_000
    require_bound: bool = False


@dataclass(frozen=True)
class GatewayConfig:
    """The HTTP ext_authz endpoint and the proxies whose certificate headers are believed."""

    ext_authz_prefix: str = "/ext_authz"
    #: Whose original-request headers to read on the HTTP ext_authz endpoint: "envoy" (none: Envoy keeps
    #: the method and appends the path), "nginx" (X-Original-URI/-Method) or "traefik" (X-Forwarded-*).
    forwarded_request: str = "envoy"
    trusted_proxies: tuple[str, ...] = ()
    cert_header: str = ""
    cert_header_name: str = ""
    xfcc_element: str = "last"
    #: If set, the XFCC element read must carry this ``By`` (the trusted proxy's own URI SAN).
    xfcc_by: str = ""


@dataclass(frozen=True)
class IntrospectionConfig:
    """The RFC 7662 endpoint pdp serves to resource servers, and who may call it."""

    enabled: bool = False
    issuer: str = "http://127.0.0.1:8181"
    clients: tuple[IntrospectionClient, ...] = ()
    #: Seconds of clock skew forgiven on exp/nbf/iat when answering; 0: the resource server judges exp.
    leeway: float = 0.0
    #: Failed client_secret_basic attempts: per-source and per-client lock-outs.
    lockout: LockoutSettings = field(default_factory=LockoutSettings)


@dataclass(frozen=True)
class StoreConfig:
    """Shared state: "" keeps it in memory (one process); a redis:// or rediss:// URL shares it."""

    url: str = ""
    prefix: str = "pdp:"
    timeout: float = 0.2
    #: Authenticates the introspection answers replicas share (``pdp.credentials.shared_introspection``);
    #: None: with ``url``, answers are not shared. Never shown.
    secret: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class InventoryConfig:
    """The client-identity inventory (``pdp.certificates.inventory``)."""

    enabled: bool = True
    max_identities: int = 100_000
    #: Seconds between two last-seen updates of one identity.
    update_interval: float = 60.0
    #: Seconds a certificate stays listed after its notAfter.
    keep_expired: float = 7 * 86400.0


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    decisions: bool = True
    #: Add the policy's input document, credentials redacted, to each decision line (``pdp policy diff``).
    include_input: bool = False
    #: Further request headers (lower-case names) whose values a recorded input never holds.
    redact_headers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    certificates: CertificatesConfig = field(default_factory=CertificatesConfig)
    tokens: TokensConfig = field(default_factory=TokensConfig)
    decision: DecisionSettings = field(default_factory=DecisionSettings)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    dpop: DpopSettings = field(default_factory=DpopSettings)
    introspection: IntrospectionConfig = field(default_factory=IntrospectionConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    log: LogConfig = field(default_factory=LogConfig)
    inventory: InventoryConfig = field(default_factory=InventoryConfig)
    source: Path | None = None

    @classmethod
    def defaults(cls) -> Config:
        return cls()


_HEADER_NAME = re.compile(r"[A-Za-z0-9-]+")


class _Table:
    """A TOML table being read: typed getters that name the key on error, and a check for unknown keys."""

    def __init__(self, data: Mapping[str, Any], path: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(path, "must be a table")
        self.data = data
        self.path = path
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def _get(self, name: str) -> Any:
        self.used.add(name)
        return self.data.get(name)

    def text(self, name: str, default: str | None = None, *, required: bool = False) -> str | None:
        value = self._get(name)
        if value is None:
            if required:
                raise self.missing(name)
            return default
        if not isinstance(value, str) or not value:
            raise ConfigError(self.key(name), "must be a non-empty string")
        return value

    def missing(self, name: str, why: str = "is required") -> ConfigError:
        """The error for a missing key, pointing at a misspelling of it if the table has one."""
        typo = difflib.get_close_matches(name, [k for k in self.data if k not in self.used], n=1)
        if typo:
            return ConfigError(self.key(typo[0]), f"unknown key (did you mean {name!r}?)")
        return ConfigError(self.key(name), why)

    def flag(self, name: str, default: bool) -> bool:
        value = self._get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ConfigError(self.key(name), "must be true or false")
        return value

    def number(self, name: str, default: float, *, minimum: float = 0.0) -> float:
        value = self._get(name)
        if value is None:
            return default
        if not isinstance(value, int | float) or isinstance(value, bool) or value < minimum:
            raise ConfigError(self.key(name), f"must be a number >= {minimum:g}")
        return float(value)

    def integer(self, name: str, default: int, *, minimum: int = 0) -> int:
        value = self._get(name)
        if value is None:
            return default
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ConfigError(self.key(name), f"must be an integer >= {minimum}")
        return value

    def strings(self, name: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self._get(name)
        if value is None:
            return default
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(self.key(name), "must be a list of non-empty strings")
        return tuple(value)

    def table(self, name: str) -> _Table:
        value = self._get(name)
        return _Table(value if value is not None else {}, self.key(name))

    def tables(self, name: str) -> list[_Table]:
        value = self._get(name)
        if value is None:
            return []
        if not isinstance(value, list):
            raise ConfigError(self.key(name), "must be an array of tables ([[...]])")
        return [_Table(v, f"{self.key(name)}[{i}]") for i, v in enumerate(value)]

    def done(self) -> None:
        for name in self.data:
            if name not in self.used:
                hint = difflib.get_close_matches(name, self.used, n=1)
                suffix = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise ConfigError(self.key(name), f"unknown key{suffix}")


def _path(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


def parse_listen(value: str, key: str, *, allow_off: bool = False) -> str:
    """Check a HOST:PORT listen address ("" when ``allow_off``); the error names ``key``."""
    if allow_off and value == "":
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(key, f"must be HOST:PORT, not {value!r}")
    return value


def _listen(t: _Table, name: str, default: str) -> str:
    return parse_listen(t.text(name, default) or default, t.key(name))


def _listener_tls(t: _Table, base: Path) -> ListenerTls:
    cert = t.text("cert", required=True)
    key = t.text("key", required=True)
    assert cert is not None and key is not None
    client_ca = t.text("client_ca")
    allowed = t.strings("allowed_callers")
    if allowed and client_ca is None:
        raise ConfigError(t.key("allowed_callers"), "needs client_ca: callers are known by their certificates")
    paths = {"cert": _path(base, cert), "key": _path(base, key)}
    if client_ca is not None:
        paths["client_ca"] = _path(base, client_ca)
    for name, path in paths.items():
        if not path.is_file():
            raise ConfigError(t.key(name), f"{str(path)!r} is not a readable file")
    t.done()
    return ListenerTls(cert=paths["cert"], key=paths["key"], client_ca=paths.get("client_ca"),
                       allowed_callers=allowed)


def _server(t: _Table, base: Path) -> ServerConfig:
    t.used.add("grpc")
    grpc = t.data.get("grpc", ServerConfig.grpc)
    if not isinstance(grpc, str):
        raise ConfigError(t.key("grpc"), "must be HOST:PORT, or \"\" to turn the gRPC listener off")
    cfg = ServerConfig(
        tls=_listener_tls(t.table("tls"), base) if "tls" in t.data else None,
        http=_listen(t, "http", ServerConfig.http),
        grpc=parse_listen(grpc, t.key("grpc"), allow_off=True),
        grpc_workers=t.integer("grpc_workers", ServerConfig.grpc_workers, minimum=1),
        reload_interval=t.number("reload_interval", ServerConfig.reload_interval),
        max_body_bytes=t.integer("max_body_bytes", ServerConfig.max_body_bytes, minimum=1024),
        admin=t.flag("admin", ServerConfig.admin),
        admin_callers=t.strings("admin_callers"),
    )
    _check_admin(t, cfg)
    t.done()
    return cfg


def _check_admin(t: _Table, cfg: ServerConfig) -> None:
    """The admin endpoints change what every replica enforces: never on a listener anyone can reach."""
    if cfg.admin_callers and not cfg.admin:
        raise ConfigError(t.key("admin_callers"), "needs admin = true")
    if not cfg.admin:
        return
    if cfg.tls is None or cfg.tls.client_ca is None or not cfg.tls.allowed_callers:
        raise ConfigError(t.key("admin"), "needs a mutual-TLS listener that admits named callers "
                                          "(server.tls with client_ca and allowed_callers)")
    if not cfg.admin_callers:
        # Every caller allowed to ask for decisions (each gateway) would be an admin, able to revoke and unrevoke.
        raise ConfigError(t.key("admin_callers"), "must name the admin callers when admin = true (the gateways "
                                                  "in server.tls.allowed_callers are not all admins)")
    allowed = {identity_key(a) for a in cfg.tls.allowed_callers}
    outside = [c for c in cfg.admin_callers if identity_key(c) not in allowed]
    if outside:
        raise ConfigError(t.key("admin_callers"), f"{outside[0]!r} is not in server.tls.allowed_callers, "
                                                  "so the listener refuses it before any endpoint")


def _policy(t: _Table, base: Path) -> PolicyConfig:
    engine = t.text("engine", PolicyConfig.engine) or PolicyConfig.engine
    if engine not in ENGINES:
        raise ConfigError(t.key("engine"), f"must be one of {', '.join(ENGINES)}")
    paths = tuple(_path(base, p) for p in t.strings("paths")) or PolicyConfig.paths
    data = tuple(_path(base, p) for p in t.strings("data"))
    decision = t.text("decision", PolicyConfig.decision) or PolicyConfig.decision
    cache = t.integer("decision_cache_size", PolicyConfig.decision_cache_size, minimum=0)
    divergence = t.text("divergence", PolicyConfig.divergence) or PolicyConfig.divergence
    if divergence not in ("refuse", "warn"):
        raise ConfigError(t.key("divergence"), "must be one of refuse, warn")
    rego_version = t.text("rego_version", PolicyConfig.rego_version) or PolicyConfig.rego_version
    if rego_version not in REGO_VERSIONS:
        raise ConfigError(t.key("rego_version"), f"must be one of {', '.join(REGO_VERSIONS)}")
    if rego_version == "v0" and engine != "regorus":
        raise ConfigError(t.key("rego_version"), "\"v0\" needs engine = \"regorus\" (regopy reads Rego v1 only)")
    dry_run = t.flag("dry_run", PolicyConfig.dry_run)
    shadow = _shadow_policy(t.table("shadow"), base, engine, decision, rego_version) if "shadow" in t.data else None
    opa = _opa(t.table("opa"), base) if "opa" in t.data else None
    proto_descriptor = t.text("proto_descriptor")
    if engine == "opa":
        if opa is None:
            raise ConfigError(t.key("opa.url"), "is required when engine = \"opa\" (the OPA server to ask)")
        if not all(_REGO_NAME.fullmatch(part) for part in decision.strip().removeprefix("data.").strip("/")
                   .replace(".", "/").split("/")):
            raise ConfigError(t.key("decision"), "must be a path of Rego names (pdp/authz/result) for engine = \"opa\"")
        if entrypoint_query(decision) in ("data", "data."):
            raise ConfigError(t.key("decision"), "names the whole data tree: name the decision's rule "
                                                 "(pdp/authz/result)")
    t.done()
    return PolicyConfig(engine=engine, paths=paths, data=data, decision=decision, decision_cache_size=cache,
                        divergence=divergence, rego_version=rego_version, dry_run=dry_run, shadow=shadow, opa=opa,
                        proto_descriptor=_path(base, proto_descriptor) if proto_descriptor else None)


_REGO_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_URL_SEGMENT = re.compile(r"(?!\.\.?$)[A-Za-z0-9._~-]+")


_MAX_OPA_CONNECTIONS = 1024


def _opa(t: _Table, base: Path) -> OpaConfig:
    url = t.text("url", required=True)
    assert url is not None
    if any(c.isspace() or not c.isprintable() for c in url) or "?" in url or "#" in url:
        raise ConfigError(t.key("url"), "holds spaces, control characters, a query ('?') or a fragment ('#')")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError on a port that is no number or out of range)
    except ValueError as exc:
        raise ConfigError(t.key("url"), f"is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(t.key("url"), "must be an http:// or https:// URL naming a host")
    if parts.query or parts.fragment or parts.username is not None or parts.password is not None:
        raise ConfigError(t.key("url"), "takes no query, fragment or user name (the token goes in token_file)")
    # A path is the prefix OPA is served under (behind a reverse proxy): plain segments, without OPA's /v1.
    segments = [s for s in parts.path.split("/") if s]
    if not all(_URL_SEGMENT.fullmatch(s) for s in segments) or "".join(f"/{s}" for s in segments) \
            != parts.path.rstrip("/"):
        raise ConfigError(t.key("url"), f"path {parts.path!r} is not a plain prefix (letters, digits, '-', '_', "
                                        "'.', '~' between single '/'; no '.' or '..' segment, no escapes)")
    if segments and segments[-1] == "v1":
        raise ConfigError(t.key("url"), "must be OPA's base URL, without /v1 (pdp adds /v1/data/...)")
    url = f"{parts.scheme}://{url.split('://', 1)[1]}"  # the scheme in lower case (RFC 3986 §3.1)
    token_file, ca = t.text("token_file"), t.text("ca")
    if ca is not None and parts.scheme != "https":
        raise ConfigError(t.key("ca"), "only goes with an https:// url")
    client_cert, client_key = t.text("client_cert"), t.text("client_key")
    if client_cert is not None and client_key is None:
        raise ConfigError(t.key("client_key"), "is required with client_cert (both or neither)")
    if client_key is not None and client_cert is None:
        raise ConfigError(t.key("client_cert"), "is required with client_key (both or neither)")
    if client_cert is not None and parts.scheme != "https":
        # Over plain http the certificate authenticates nothing (there is no handshake): a mistaken url.
        raise ConfigError(t.key("client_cert"), "only goes with an https:// url (over http no certificate is "
                                                "presented)")
    max_connections = t.integer("max_connections", OpaConfig.max_connections, minimum=1)
    if max_connections > _MAX_OPA_CONNECTIONS:
        raise ConfigError(t.key("max_connections"), f"must be an integer from 1 to {_MAX_OPA_CONNECTIONS}")
    cfg = OpaConfig(url=url.rstrip("/"), timeout=t.number("timeout", OpaConfig.timeout, minimum=0.01),
                    token_file=_path(base, token_file) if token_file else None,
                    ca=_path(base, ca) if ca else None,
                    max_answer_bytes=t.integer("max_answer_bytes", OpaConfig.max_answer_bytes, minimum=1024),
                    client_cert=_path(base, client_cert) if client_cert else None,
                    client_key=_path(base, client_key) if client_key else None,
                    max_connections=max_connections,
                    unready_after_failure=t.number("unready_after_failure", OpaConfig.unready_after_failure))
    t.done()
    return cfg


def _shadow_policy(t: _Table, base: Path, engine: str, decision: str, rego_version: str) -> ShadowPolicyConfig:
    if engine not in ("regorus", "regopy"):  # evaluated in process beside the enforced policy, on its engine
        raise ConfigError(t.path, f"needs an embedded engine (regorus or regopy), not policy.engine = {engine!r}")
    paths = tuple(_path(base, p) for p in t.strings("paths"))
    if not paths:
        raise t.missing("paths", "is required: the shadow policy's folders or .rego files")
    version = t.text("rego_version", rego_version) or rego_version
    if version not in REGO_VERSIONS:
        raise ConfigError(t.key("rego_version"), f"must be one of {', '.join(REGO_VERSIONS)}")
    if version == "v0" and engine != "regorus":
        raise ConfigError(t.key("rego_version"), "\"v0\" needs engine = \"regorus\" (regopy reads Rego v1 only)")
    cfg = ShadowPolicyConfig(paths=paths, data=tuple(_path(base, p) for p in t.strings("data")),
                             decision=t.text("decision", decision) or decision, rego_version=version,
                             timeout=t.number("timeout", ShadowPolicyConfig.timeout, minimum=0.01))
    t.done()
    return cfg


def _certificates(t: _Table, base: Path) -> CertificatesConfig:
    bundles: list[TrustBundleConfig] = []
    names: set[str] = set()
    for b in t.tables("trust_bundles"):
        file = b.text("file", required=True)
        assert file is not None
        name = b.text("name", file) or file
        if name in names:
            raise ConfigError(b.key("name"), f"trust bundle name {name!r} is used twice")
        names.add(name)
        domain = b.text("trust_domain")
        if domain is not None:
            try:
                if parse_spiffe_id(f"spiffe://{domain}").path:
                    raise SpiffeIdError("a trust domain has no path")
            except SpiffeIdError as exc:
                raise ConfigError(b.key("trust_domain"), f"not a SPIFFE trust domain: {exc}") from exc
        intermediates = b.text("intermediates")
        crls = tuple(_path(base, c) for c in b.strings("crls"))
        require_crl = b.flag("require_crl", False)
        if require_crl and not crls:
            raise ConfigError(b.key("crls"), "is required with require_crl = true")
        mode = b.text("revocation", TrustBundleConfig.revocation) or TrustBundleConfig.revocation
        if mode not in ("hard", "soft"):
            raise ConfigError(b.key("revocation"), "must be one of hard, soft")
        d = TrustBundleConfig
        bundle = TrustBundleConfig(
            name=name, file=_path(base, file), trust_domain=domain,
            intermediates=_path(base, intermediates) if intermediates else None, crls=crls, require_crl=require_crl,
            revocation=mode, ocsp=b.flag("ocsp", d.ocsp),
            crl_distribution_points=b.flag("crl_distribution_points", d.crl_distribution_points),
            require_revocation=b.flag("require_revocation", d.require_revocation),
            revocation_timeout=b.number("revocation_timeout", d.revocation_timeout, minimum=0.001),
            max_crl_bytes=b.integer("max_crl_bytes", d.max_crl_bytes, minimum=1024))
        b.done()
        bundles.append(bundle)
    cfg = CertificatesConfig(
        trust_bundles=tuple(bundles),
        max_chain_depth=t.integer("max_chain_depth", CertificatesConfig.max_chain_depth, minimum=1),
        cache_size=t.integer("cache_size", CertificatesConfig.cache_size),
    )
    t.done()
    return cfg


def _issuer(t: _Table, base: Path) -> IssuerConfig:
    issuer = t.text("issuer", required=True)
    assert issuer is not None
    audiences = t.strings("audiences")
    if not audiences:
        raise t.missing("audiences", "is required: list the audiences this service accepts")
    algorithms = t.strings("algorithms", ("RS256", "ES256"))
    for alg in algorithms:
        if alg.lower() == "none" or alg.upper().startswith("HS"):
            raise ConfigError(t.key("algorithms"), f"{alg!r} is never accepted (no 'none', no HMAC)")
        if alg not in ASYMMETRIC_ALGORITHMS:
            raise ConfigError(t.key("algorithms"),
                              f"unknown algorithm {alg!r} (one of {', '.join(ASYMMETRIC_ALGORITHMS)})")
    jwks_file = t.text("jwks_file")
    jwks_url = t.text("jwks_url")
    discovery = t.flag("discovery", False)
    endpoint = t.text("introspection_endpoint")
    if (jwks_file is not None) + (jwks_url is not None) + discovery + (endpoint is not None) != 1:
        raise ConfigError(t.path, "needs exactly one of jwks_file, jwks_url, discovery = true "
                                  "or introspection_endpoint (opaque tokens)")
    opaque = _opaque_settings(t, base, endpoint)
    if jwks_url is not None and not jwks_url.startswith(("https://", "http://")):
        raise ConfigError(t.key("jwks_url"), "must be an http(s) URL")
    if discovery and not issuer.startswith(("https://", "http://")):
        raise ConfigError(t.key("discovery"), "needs an issuer that is an http(s) URL")
    plain = t.flag("accept_plain_jwt", False)
    default_claims = PLAIN_REQUIRED_CLAIMS if plain else PROFILE_REQUIRED_CLAIMS
    required = tuple(dict.fromkeys(("iss", "exp", *t.strings("required_claims", default_claims))))
    cfg = IssuerConfig(
        issuer=issuer, audiences=audiences, algorithms=algorithms,
        jwks_file=_path(base, jwks_file) if jwks_file else None, jwks_url=jwks_url, discovery=discovery,
        accept_plain_jwt=plain, required_claims=required,
        jwks_timeout=t.number("jwks_timeout", IssuerConfig.jwks_timeout, minimum=0.1),
        jwks_refresh_interval=t.number("jwks_refresh_interval", IssuerConfig.jwks_refresh_interval, minimum=1),
        jwks_min_refresh_interval=t.number("jwks_min_refresh_interval", IssuerConfig.jwks_min_refresh_interval),
        **opaque,
    )
    t.done()
    return cfg


def _opaque_settings(t: _Table, base: Path, endpoint: str | None) -> dict[str, Any]:
    names = ("introspection_auth", "introspection_client_id", "introspection_client_secret",
             "introspection_client_cert", "introspection_client_key", "introspection_ca")
    if endpoint is None:
        for name in names:
            if name in t.data:
                raise ConfigError(t.key(name), "only goes with introspection_endpoint")
        return {}
    if not endpoint.startswith(("https://", "http://")):
        raise ConfigError(t.key("introspection_endpoint"), "must be an http(s) URL")
    client_id = t.text("introspection_client_id", required=True)
    secret = t.text("introspection_client_secret")
    cert = t.text("introspection_client_cert")
    key = t.text("introspection_client_key")
    auth = t.text("introspection_auth", "tls_client_auth" if cert and not secret else "client_secret_basic")
    if auth not in ("client_secret_basic", "client_secret_post", "tls_client_auth"):
        raise ConfigError(t.key("introspection_auth"),
                          "must be client_secret_basic, client_secret_post or tls_client_auth")
    if auth == "tls_client_auth" and cert is None:
        raise ConfigError(t.key("introspection_client_cert"), "is required for tls_client_auth")
    if auth != "tls_client_auth" and secret is None:
        raise ConfigError(t.key("introspection_client_secret"), f"is required for {auth}")
    ca = t.text("introspection_ca")
    return {
        "introspection_endpoint": endpoint, "introspection_auth": auth, "introspection_client_id": client_id,
        "introspection_client_secret": secret,
        "introspection_client_cert": _path(base, cert) if cert else None,
        "introspection_client_key": _path(base, key) if key else None,
        "introspection_ca": _path(base, ca) if ca else None,
        "introspection_cache_ttl": t.number("introspection_cache_ttl", 300.0),
        "introspection_negative_ttl": t.number("introspection_negative_ttl", 10.0),
        "introspection_timeout": t.number("introspection_timeout", 3.0, minimum=0.1),
    }


def _tokens(t: _Table, base: Path) -> TokensConfig:
    issuers = tuple(_issuer(i, base) for i in t.tables("issuers"))
    opaque = [i for i, iss in enumerate(issuers) if iss.opaque]
    if len(opaque) > 1:
        # An opaque token names no issuer: with two introspection endpoints, every token would be
        # shown to both authorization servers, and either could vouch for the other's tokens.
        raise ConfigError(f"{t.key('issuers')}[{opaque[1]}].introspection_endpoint",
                          "only one issuer may use introspection (opaque tokens name no issuer)")
    seen: set[str] = set()
    for i, iss in enumerate(issuers):
        if iss.issuer in seen:
            raise ConfigError(f"{t.key('issuers')}[{i}].issuer", f"issuer {iss.issuer!r} is configured twice")
        seen.add(iss.issuer)
    cfg = TokensConfig(
        issuers=issuers,
        leeway=t.number("leeway", TokensConfig.leeway),
        cache_size=t.integer("cache_size", TokensConfig.cache_size),
        require_bound=t.flag("require_bound", TokensConfig.require_bound),
    )
    t.done()
    return cfg


def _decision(t: _Table, require_bound: bool) -> DecisionSettings:
    d = DecisionSettings()
    h = t.table("upstream_headers")
    up = UpstreamHeaders()
    upstream = UpstreamHeaders(**{name: _header_name(h, name, getattr(up, name))
                                  for name in UpstreamHeaders.__dataclass_fields__})
    h.done()
    cfg = DecisionSettings(
        realm=t.text("realm", d.realm) or d.realm,
        require_bound_tokens=require_bound,
        remove_authorization=t.flag("remove_authorization", d.remove_authorization),
        upstream=upstream,
        max_header_bytes=t.integer("max_header_bytes", d.max_header_bytes, minimum=1024),
        max_headers=t.integer("max_headers", d.max_headers, minimum=1),
        max_path_bytes=t.integer("max_path_bytes", d.max_path_bytes, minimum=256),
    )
    t.done()
    return cfg


def _header_name(t: _Table, name: str, default: str) -> str:
    value = t.data.get(name, default)
    t.used.add(name)
    if not isinstance(value, str) or (value and _HEADER_NAME.fullmatch(value) is None):
        raise ConfigError(t.key(name), "must be a header name, or \"\" to leave the header out")
    return value.lower()


#: ``gateway.ext_authz_prefix``: plain path segments (no dot segments), nothing a router or a decoder reads.
_PREFIX = re.compile(r"(?:/(?!\.\.?(?:/|$))[A-Za-z0-9._~-]+)+")


def _gateway(t: _Table) -> GatewayConfig:
    from pdp.adapters.cert_headers import FORMATS, parse_networks

    d = GatewayConfig()
    prefix = t.text("ext_authz_prefix", d.ext_authz_prefix) or d.ext_authz_prefix
    if not prefix.startswith("/") or prefix.endswith("/"):
        raise ConfigError(t.key("ext_authz_prefix"), "must be a path like /ext_authz (no trailing slash)")
    if _PREFIX.fullmatch(prefix) is None:
        # '{name}' is a pattern to a router, not text: '/{p:path}' would take every path, pdp's own included.
        raise ConfigError(t.key("ext_authz_prefix"), "must be a path of letters, digits and - . _ ~ only, "
                                                     "in segments that are not empty, '.' or '..'")
    # pdp's own endpoints: a prefix at or under one would send a gateway's checks there (or shadow it).
    reserved = ("/v1", "/healthz", "/readyz", "/metrics", "/admin", "/oauth2", "/.well-known")
    taken = next((r for r in reserved if prefix.lower() == r or prefix.lower().startswith(r + "/")), None)
    if taken is not None:
        raise ConfigError(t.key("ext_authz_prefix"), f"must not be {taken} or under it: pdp serves its own "
                                                     "endpoints there")
    forwarded = t.text("forwarded_request", d.forwarded_request) or d.forwarded_request
    if forwarded not in ("envoy", "nginx", "traefik"):
        raise ConfigError(t.key("forwarded_request"), "must be envoy, nginx or traefik")
    proxies = t.strings("trusted_proxies")
    try:
        parse_networks(p for p in proxies if not p.lower().startswith(("spiffe://", "dns:")))
    except ValueError as exc:
        raise ConfigError(t.key("trusted_proxies"), f"not an address or network: {exc}") from exc
    fmt = t.data.get("cert_header", "")
    t.used.add("cert_header")
    if fmt != "" and fmt not in FORMATS:
        raise ConfigError(t.key("cert_header"), f"must be one of {', '.join(FORMATS)}, or \"\"")
    if fmt and not proxies:
        raise ConfigError(t.key("trusted_proxies"), "is required with cert_header: whose headers to believe")
    element = t.text("xfcc_element", "last") or "last"
    if element not in ("last", "first"):
        raise ConfigError(t.key("xfcc_element"), "must be last or first")
    cfg = GatewayConfig(ext_authz_prefix=prefix, forwarded_request=forwarded, trusted_proxies=proxies,
                        cert_header=fmt,
                        cert_header_name=(t.text("cert_header_name", "") or "").lower(), xfcc_element=element,
                        xfcc_by=t.text("xfcc_by", "") or "")
    t.done()
    return cfg


def _dpop(t: _Table) -> DpopSettings:
    d = DpopSettings()
    algorithms = t.strings("algorithms", tuple(sorted(d.algorithms)))
    for alg in algorithms:
        if alg not in ASYMMETRIC_ALGORITHMS:
            raise ConfigError(t.key("algorithms"), f"{alg!r} is not an asymmetric JWS algorithm")
    secret = t.text("nonce_secret")
    require_nonce = t.flag("require_nonce", False)
    cfg = DpopSettings(
        algorithms=frozenset(algorithms),
        iat_window=t.number("iat_window", d.iat_window, minimum=1),
        require_nonce=require_nonce,
        nonce_lifetime=t.number("nonce_lifetime", d.nonce_lifetime, minimum=10),
        max_proofs_per_key=t.integer("max_proofs_per_key", d.max_proofs_per_key, minimum=1),
        busy_proofs_per_key=t.integer("busy_proofs_per_key", 0, minimum=1) or None,
        replay_margin=t.number("replay_margin", d.replay_margin, minimum=0),
        nonce_secret=secret.encode() if secret else d.nonce_secret,
    )
    if secret is not None and len(secret) < 32:
        raise ConfigError(t.key("nonce_secret"), "must be at least 32 characters")
    t.done()
    return cfg


def _introspection(t: _Table, tokens: TokensConfig) -> IntrospectionConfig:
    from pdp.adapters.introspection import TLS_CLIENT_AUTH_NAMES, IntrospectionClient

    accepted = {aud for iss in tokens.issuers for aud in iss.audiences}
    enabled = t.flag("enabled", False)
    issuer = t.text("issuer", IntrospectionConfig.issuer) or IntrospectionConfig.issuer
    if not issuer.startswith(("https://", "http://")):
        raise ConfigError(t.key("issuer"), "must be an http(s) URL")
    clients: list[IntrospectionClient] = []
    for c in t.tables("clients"):
        client_id = c.text("client_id", required=True)
        assert client_id is not None
        secret = c.text("secret_sha256")
        if secret is not None and (len(secret) != 64 or any(ch not in "0123456789abcdef" for ch in secret.lower())):
            raise ConfigError(c.key("secret_sha256"), "must be the hex SHA-256 of the client secret")
        names = [(n, c.text(n)) for n in TLS_CLIENT_AUTH_NAMES]
        given = [(n, v) for n, v in names if v is not None]
        if len(given) > 1:
            raise ConfigError(c.path, "at most one tls_client_auth_* name per client (RFC 8705 §2.1.2)")
        if secret is None and not given:
            raise ConfigError(c.path, "needs secret_sha256 or a tls_client_auth_* name")
        audiences = c.strings("audiences") if "audiences" in c.data else None
        if audiences is not None:
            unknown = [a for a in audiences if a not in accepted]
            if not audiences or unknown:
                raise ConfigError(c.key("audiences"), f"{unknown[0]!r} is no issuer's audience" if unknown else
                                  "must list at least one audience (leave it out for all of pdp's)")
        c.done()
        if any(existing.client_id == client_id for existing in clients):
            raise ConfigError(c.key("client_id"), f"client {client_id!r} is configured twice")
        clients.append(IntrospectionClient(client_id, secret.lower() if secret else None,
                                           (given[0][0], str(given[0][1])) if given else None,
                                           frozenset(audiences) if audiences is not None else None))
    if enabled and not clients:
        raise ConfigError(t.key("clients"), "is required when the introspection endpoint is enabled")
    cfg = IntrospectionConfig(enabled=enabled, issuer=issuer, clients=tuple(clients),
                              leeway=t.number("leeway", IntrospectionConfig.leeway),
                              lockout=_lockout(t.table("lockout")))
    t.done()
    return cfg


def _lockout(t: _Table) -> LockoutSettings:
    d = LockoutSettings()
    cfg = LockoutSettings(
        source_failures=t.integer("source_failures", d.source_failures, minimum=1),
        client_failures=t.integer("client_failures", d.client_failures, minimum=1),
        window=t.number("window", d.window, minimum=1),
        duration=t.number("duration", d.duration, minimum=1),
        max_duration=t.number("max_duration", d.max_duration, minimum=1),
        max_tracked=t.integer("max_tracked", d.max_tracked, minimum=100),
    )
    if cfg.max_duration < cfg.duration:
        raise ConfigError(t.key("max_duration"), "must be at least duration")
    t.done()
    return cfg


def _store(t: _Table) -> StoreConfig:
    url = t.data.get("url", "")
    t.used.add("url")
    if not isinstance(url, str) or (url and not url.startswith(("redis://", "rediss://", "unix://"))):
        raise ConfigError(t.key("url"), "must be \"\" (in memory) or a redis://, rediss:// or unix:// URL")
    text = t.text("secret")
    try:
        secret = decode_secret(text) if text is not None else None
    except ValueError as exc:
        raise ConfigError(t.key("secret"), str(exc)) from None
    cfg = StoreConfig(url=url, prefix=t.text("prefix", "pdp:") or "pdp:",
                      timeout=t.number("timeout", 0.2, minimum=0.01), secret=secret)
    t.done()
    return cfg


def _inventory(t: _Table) -> InventoryConfig:
    d = InventoryConfig()
    cfg = InventoryConfig(
        enabled=t.flag("enabled", d.enabled),
        max_identities=t.integer("max_identities", d.max_identities, minimum=1),
        update_interval=t.number("update_interval", d.update_interval, minimum=1),
        keep_expired=t.number("keep_expired", d.keep_expired),
    )
    t.done()
    return cfg


_HEADER_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 §5.1 field-name


def _log(t: _Table) -> LogConfig:
    level = (t.text("level", "info") or "info").lower()
    if level not in ("debug", "info", "warning", "error"):
        raise ConfigError(t.key("level"), "must be debug, info, warning or error")
    redact = t.strings("redact_headers")
    if not all(_HEADER_TOKEN.fullmatch(name) for name in redact):
        raise ConfigError(t.key("redact_headers"), "must be a list of header names")
    cfg = LogConfig(level=level, decisions=t.flag("decisions", True),
                    include_input=t.flag("include_input", LogConfig.include_input),
                    redact_headers=tuple(name.lower() for name in redact))
    t.done()
    return cfg


def parse_config(data: Mapping[str, Any], base: Path, source: Path | None = None) -> Config:
    root = _Table(data, "")
    tokens = _tokens(root.table("tokens"), base)
    cfg = Config(
        server=_server(root.table("server"), base),
        policy=_policy(root.table("policy"), base),
        certificates=_certificates(root.table("certificates"), base),
        tokens=tokens,
        decision=_decision(root.table("decision"), tokens.require_bound),
        gateway=_gateway(root.table("gateway")),
        dpop=_dpop(root.table("dpop")),
        introspection=_introspection(root.table("introspection"), tokens),
        store=_store(root.table("store")),
        log=_log(root.table("log")),
        inventory=_inventory(root.table("inventory")),
        source=source,
    )
    root.done()
    return cfg


def load_config(path: Path) -> Config:
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("", f"cannot read config file {str(path)!r}: {exc}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"{path}: not valid TOML: {exc}") from exc
    return parse_config(data, path.resolve().parent, path)
