"""Build a ``Pdp`` from a ``Config``: load trust bundles, key sets and the policy, wire the key fetchers.

Also knows which files each part came from, so the service can re-read a
part when its files change; a new version that fails to load raises
``LoadError`` and the caller keeps the one in force.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pdp.adapters.cert_headers import CertificateHeaders
from pdp.certificates.inventory import InventoryRecorder
from pdp.certificates.online_revocation import OnlineRevocation
from pdp.certificates.revocation import RevocationPolicy
from pdp.certificates.trust import ChainVerifier, TrustBundle
from pdp.certificates.trust import load_bundle as load_trust_bundle
from pdp.config import Config, IssuerConfig
from pdp.credentials.http_fetch import HttpFetch
from pdp.credentials.introspection_client import IntrospectionClient
from pdp.credentials.jwks import KeySet, KeySetError, RemoteKeySource, StaticKeySource, discovered_jwks_url, parse_jwks
from pdp.credentials.opaque import OpaqueIssuer, OpaqueVerifier, StoreFailure
from pdp.credentials.shared_introspection import SharedAnswers
from pdp.credentials.tokens import Issuer, TokenVerifier
from pdp.errors import LoadError
from pdp.pipeline import DecisionSink, Pdp
from pdp.policy import callcheck, divergence, rego_ast
from pdp.policy.engine import PolicyBundle, PolicyEngine, load_bundle, tree_files
from pdp.policy.grpc_body import GrpcMessages
from pdp.policy.opa_remote import remote_engine
from pdp.policy.rego import probe_compile
from pdp.policy.shadow import Trial
from pdp.request_reader import GatewaySettings, RequestReader, UntrustedHeader
from pdp.service.decision_log import DecisionLog
from pdp.service.revocation_sync import initial_list
from pdp.store import MemoryStore, RedisStore, Store

log = logging.getLogger("pdp")

Fetch = Callable[[str], bytes]


def load_policy(config: Config, *, probe: bool = True) -> PolicyEngine:
    p = config.policy
    if p.dry_run:  # at start-up and on every reload: a policy that denies nothing must not go unnoticed
        log.warning("policy.dry_run is on: the policy's denies are allowed and logged as 'would have been denied'")
    if p.engine == "opa":  # the OPA server holds the policy: policy.paths and policy.data are not read
        return remote_engine(p)
    bundle: PolicyBundle = load_bundle(p.paths, entrypoint=p.decision, engine=p.engine, data_files=p.data,
                                       rego_version=p.rego_version)
    return checked_engine(bundle, probe=probe, name="policy", divergence_mode=p.divergence,
                          cache_size=p.decision_cache_size)


def checked_engine(bundle: PolicyBundle, *, probe: bool, name: str, divergence_mode: str,
                   cache_size: int) -> PolicyEngine:
    """The engine of a loaded bundle, after the load-time checks every policy pdp runs goes through."""
    if probe:
        probe_compile(bundle)
    if bundle.engine == "regorus":
        # Refused at load, never discovered per request: calls that cannot run, and constructs that mean
        # something else here than on OPA (``policy.divergence`` = "warn" lets the latter through, logged).
        tree = rego_ast.parse(bundle.modules, rego_version=bundle.rego_version)
        callcheck.check(tree)
        for found in divergence.check(tree, divergence_mode):
            log.warning("%s: %s", name, found)
    return PolicyEngine(bundle, decision_cache_size=cache_size)


def load_shadow_policy(config: Config, *, probe: bool = True) -> PolicyEngine | None:
    """The ``[policy.shadow]`` policy, loaded and checked as the enforced one is (on its engine, with
    its divergence setting and cache size); None when none is configured. A failure names a
    ``policy.shadow.*`` key."""
    shadow = config.policy.shadow
    if shadow is None:
        return None
    try:
        bundle = load_bundle(shadow.paths, entrypoint=shadow.decision, engine=config.policy.engine,
                             key="policy.shadow.paths", data_files=shadow.data, rego_version=shadow.rego_version)
        return checked_engine(bundle, probe=probe, name="policy.shadow", divergence_mode=config.policy.divergence,
                              cache_size=config.policy.decision_cache_size)
    except LoadError as exc:  # the checks name the enforced policy's keys: name the shadow's
        own = exc.key.rsplit(".", 1)[-1]
        key = exc.key if exc.key.startswith("policy.shadow.") else \
            f"policy.shadow.{own if own in ('paths', 'data', 'rego_version', 'decision') else 'paths'}"
        raise LoadError(key, exc.message) from exc


def build_trial(config: Config, decision_log: DecisionLog, shadow: PolicyEngine | None = None) -> Trial | None:
    """The shadow policy, dry run and input recording of ``config``, or None when all are off. The
    shadow's process starts with its first input; ``Trial.close`` stops it."""
    if shadow is None and not config.policy.dry_run and not config.log.include_input:
        return None
    return Trial(shadow=shadow, dry_run=config.policy.dry_run, decision_log=decision_log,
                 include_input=config.log.include_input, redact_headers=config.log.redact_headers,
                 shadow_timeout=config.policy.shadow.timeout if config.policy.shadow is not None else 1.0,
                 shadow_cache_size=config.policy.decision_cache_size)


def load_grpc_messages(config: Config) -> GrpcMessages | None:
    """The gRPC messages of ``policy.proto_descriptor`` (None without it); ``LoadError`` naming the key."""
    path = config.policy.proto_descriptor
    return None if path is None else GrpcMessages.load(path)


def policy_files(config: Config) -> list[Path]:
    """The files the policy is read from; the gRPC descriptor set is reloaded with them."""
    grpc = [config.policy.proto_descriptor] if config.policy.proto_descriptor is not None else []
    opa = config.policy.opa
    if config.policy.engine == "opa" and opa is not None:  # a new token, CA or certificate: a new remote engine
        return [f for f in (opa.token_file, opa.ca, opa.client_cert, opa.client_key) if f is not None] + grpc
    return sorted(_listed_files(config.policy.paths, config.policy.data) + grpc)


def shadow_policy_files(config: Config) -> list[Path]:
    shadow = config.policy.shadow
    return [] if shadow is None else _listed_files(shadow.paths, shadow.data)


def _listed_files(paths: tuple[Path, ...], data: tuple[Path, ...]) -> list[Path]:
    files: list[Path] = list(data)
    for root in paths:
        if root.is_dir():
            files += [f for f in tree_files(root) if f.suffix in (".rego", ".json")]
        else:
            files.append(root)
    return sorted(files)


def load_trust(config: Config) -> list[TrustBundle]:
    return [load_trust_bundle(b.file, b.name, b.trust_domain, f"certificates.trust_bundles[{i}].file",
                              b.intermediates, f"certificates.trust_bundles[{i}].intermediates",
                              b.crls, f"certificates.trust_bundles[{i}].crls", b.require_crl,
                              RevocationPolicy(mode=b.revocation, ocsp=b.ocsp,
                                               crl_distribution_points=b.crl_distribution_points,
                                               require=b.require_revocation, timeout=b.revocation_timeout,
                                               max_crl_bytes=b.max_crl_bytes))
            for i, b in enumerate(config.certificates.trust_bundles)]


def build_chain_verifier(config: Config, store: Store | None = None) -> ChainVerifier:
    """The certificate step: the trust bundles, and an HTTP client and the shared ``store`` for OCSP and CRL
    distribution points (``ChainVerifier.close`` closes the client). One process's ``MemoryStore`` is not
    used: the answers are kept in process already."""
    timeout = max((b.revocation_timeout for b in config.certificates.trust_bundles), default=2.0)
    shared = None if isinstance(store, MemoryStore) else store
    return ChainVerifier(load_trust(config), max_chain_depth=config.certificates.max_chain_depth,
                         cache_size=config.certificates.cache_size,
                         revocation=OnlineRevocation(HttpFetch(timeout), shared))


def load_jwks_file(path: Path, key: str) -> KeySet:
    try:
        return parse_jwks(path.read_bytes())
    except OSError as exc:
        raise LoadError(key, f"cannot read JWKS {str(path)!r}: {exc.strerror or exc}") from exc
    except KeySetError as exc:
        raise LoadError(key, f"JWKS {str(path)!r} refused: {exc}") from exc


@dataclass
class KeySources:
    """The key source of each issuer, by issuer, and the files behind the file-based ones."""

    by_issuer: dict[str, StaticKeySource | RemoteKeySource] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    #: HTTP clients this set of sources opened (closed by ``Pdp.close``).
    clients: list[HttpFetch] = field(default_factory=list)

    def remote(self) -> list[RemoteKeySource]:
        return [s for s in self.by_issuer.values() if isinstance(s, RemoteKeySource)]


def _key_source(i: int, iss: IssuerConfig, fetch: Fetch | None,
                clients: list[HttpFetch]) -> StaticKeySource | RemoteKeySource:
    key = f"tokens.issuers[{i}]"
    if iss.jwks_file is not None:
        return StaticKeySource(load_jwks_file(iss.jwks_file, f"{key}.jwks_file"))
    get = fetch
    if get is None:
        client = HttpFetch(iss.jwks_timeout)
        clients.append(client)
        get = client
    if iss.jwks_url is not None:
        url = iss.jwks_url
        resolve: Callable[[], str] = lambda: url  # noqa: E731
    else:
        resolve = discovered_jwks_url(iss.issuer, get)
    return RemoteKeySource(resolve, get, min_interval=iss.jwks_min_refresh_interval,
                           max_age=iss.jwks_refresh_interval, name=iss.issuer)


def build_key_sources(config: Config, fetch: Fetch | None = None) -> KeySources:
    sources = KeySources()
    for i, iss in enumerate(config.tokens.issuers):
        if iss.opaque:
            continue
        sources.by_issuer[iss.issuer] = _key_source(i, iss, fetch, sources.clients)
        if iss.jwks_file is not None:
            sources.files[iss.issuer] = iss.jwks_file
    return sources


def build_certificate_headers(config: Config) -> CertificateHeaders | None:
    """The trusted-proxy certificate header reader of ``[gateway]``, if one is configured."""
    gw = config.gateway
    if not gw.cert_header:
        return None
    return CertificateHeaders(gw.cert_header, gw.trusted_proxies, header=gw.cert_header_name or None,
                              xfcc_element=gw.xfcc_element, xfcc_by=gw.xfcc_by or None)


def build_store(config: Config) -> Store:
    if not config.store.url:
        return MemoryStore()
    return RedisStore(config.store.url, prefix=config.store.prefix, timeout=config.store.timeout)


def build_token_verifier(config: Config, keys: KeySources, *, store: Store | None = None,
                         on_store_failure: StoreFailure | None = None) -> TokenVerifier:
    """JWT issuers with their key sources, and opaque-token issuers with their introspection clients.

    With a ``store`` shared with other processes (not one process's ``MemoryStore``, which the
    in-process cache already is) and ``store.secret`` to authenticate them, introspection answers are
    shared through it; without the secret they are not (a store writer could make them up)."""
    shared = None if isinstance(store, MemoryStore) else store
    secret = config.store.secret
    if shared is not None and secret is None and any(i.opaque for i in config.tokens.issuers):
        log.info("introspection answers are not shared through the store: store.secret is not set")
    jwt_issuers = [
        Issuer(issuer=i.issuer, audiences=frozenset(i.audiences), algorithms=frozenset(i.algorithms),
               keys=keys.by_issuer[i.issuer], accept_plain_jwt=i.accept_plain_jwt,
               required_claims=i.required_claims)
        for i in config.tokens.issuers if not i.opaque
    ]
    opaque = [
        OpaqueIssuer(
            issuer=i.issuer, audiences=frozenset(i.audiences),
            introspect=IntrospectionClient(
                str(i.introspection_endpoint), client_id=str(i.introspection_client_id),
                auth_method=i.introspection_auth, client_secret=i.introspection_client_secret,
                client_cert=i.introspection_client_cert, client_key=i.introspection_client_key,
                ca=i.introspection_ca, timeout=i.introspection_timeout),
            cache_ttl=i.introspection_cache_ttl, negative_ttl=i.introspection_negative_ttl,
            endpoint=str(i.introspection_endpoint), client_id=str(i.introspection_client_id))
        for i in config.tokens.issuers if i.opaque
    ]
    return TokenVerifier(jwt_issuers, leeway=config.tokens.leeway, cache_size=config.tokens.cache_size,
                         opaque=OpaqueVerifier(opaque, leeway=config.tokens.leeway,
                                               cache_size=config.tokens.cache_size, store=shared,
                                               shared=SharedAnswers(secret) if secret is not None else None,
                                               on_store_failure=on_store_failure))


def build_reader(config: Config, on_untrusted: UntrustedHeader | None = None) -> RequestReader:
    """The one request reader, with every ``[gateway]`` setting."""
    gw = config.gateway
    return RequestReader(GatewaySettings(ext_authz_prefix=gw.ext_authz_prefix, forwarded_request=gw.forwarded_request,
                                         certificate_headers=build_certificate_headers(config)),
                         on_untrusted=on_untrusted)


def build_pdp(config: Config, *, fetch: Fetch | None = None, sinks: tuple[DecisionSink, ...] = (),
              keys: KeySources | None = None, probe: bool = True, store: Store | None = None,
              on_untrusted: UntrustedHeader | None = None, on_store_failure: StoreFailure | None = None) -> Pdp:
    keys = keys or build_key_sources(config, fetch)
    store = store or build_store(config)
    tokens = build_token_verifier(config, keys, store=store, on_store_failure=on_store_failure)
    inventory = config.inventory
    recorder = InventoryRecorder(interval=inventory.update_interval, max_remembered=inventory.max_identities) \
        if inventory.enabled else None
    certificates = build_chain_verifier(config, store)
    closers = [c.close for c in keys.clients] + [
        i.introspect.close for i in tokens.opaque_issuers if isinstance(i.introspect, IntrospectionClient)] + [
        certificates.close]
    decision_log = DecisionLog(config.log.decisions)
    grpc_messages = load_grpc_messages(config)
    policy = load_policy(config, probe=probe)
    trial = build_trial(config, decision_log, load_shadow_policy(config, probe=probe))
    if trial is not None:
        closers.append(trial.close)  # the shadow's process
    pdp = Pdp(
        certificates=certificates,
        tokens=tokens,
        policy=policy,
        settings=config.decision,
        decision_log=decision_log,
        sinks=sinks,
        dpop=config.dpop,
        store=store,
        closers=tuple(closers),
        reader=build_reader(config, on_untrusted),
        revocations=initial_list(store),
        inventory=recorder,
    )
    pdp.trial = trial
    pdp.grpc_messages = grpc_messages
    return pdp
