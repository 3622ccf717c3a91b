"""The ``pdp`` command: serve, check, inspect certificates and tokens, write a dev setup, test policies."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from pdp.errors import ConfigError, LoadError, PdpError
from pdp.service.decision_log import setup_logging

if TYPE_CHECKING:
    from pdp.config import Config
    from pdp.credentials.jws import ParsedJws
    from pdp.credentials.tokens import Issuer
    from pdp.service.grpc_listener import ListenError

EXIT_ALLOW, EXIT_DENY, EXIT_ERROR = 0, 1, 2


def _print(*parts: object) -> None:
    """``print`` to standard output for a reader that may stop reading (``pdp check … | head -1``): once it
    has gone, the rest is dropped, quietly, and the command's exit status stands."""
    try:
        print(*parts, flush=True)
    except BrokenPipeError:
        _drop_stdout()


def _drop_stdout() -> None:
    """Send what is left for standard output, buffered or still to come, nowhere: its reader has gone."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # not a file descriptor (standard output replaced in process)
        pass


def _config(path: str | None) -> Any:
    from pdp.config import Config, load_config

    return load_config(Path(path)) if path else Config.defaults()


# -- serve
def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from pdp.service.grpc_listener import ListenError
    from pdp.service.server import Service, bind_http

    config = _config(args.config)
    overrides = {k: v for k, v in (("http", args.http), ("grpc", args.grpc)) if v is not None}
    if overrides:
        from pdp.config import parse_listen

        for key, value in overrides.items():
            parse_listen(value, f"--{key}", allow_off=key == "grpc")
        config = dataclasses.replace(config, server=dataclasses.replace(config.server, **overrides))
    setup_logging(args.log_level or config.log.level)
    if args.config is None:
        logging.getLogger("pdp").warning(
            "no --config: serving the embedded defaults (the shipped zero-trust policy, no trust bundles, "
            "no issuers), so every request that needs credentials is denied. `pdp dev init DIR` writes a "
            "working setup.")
    listen = config.server.http
    host, _, port = listen.rpartition(":")
    scheme = "https" if config.server.tls else "http"
    if args.workers > 1:
        from pdp.service.workers import serve_workers

        try:
            return serve_workers(config, args.config, host.strip("[]"), int(port), scheme, workers=args.workers,
                                 log_level=args.log_level or config.log.level)
        except ListenError as exc:
            return _listen_failed(exc, args.config)
    service = Service(config)
    try:
        # Every listener binds before pdp says it listens: HTTP first, then gRPC (in start()).
        sock = bind_http(listen)
        try:
            service.start()
        except BaseException:
            sock.close()
            raise
    except ListenError as exc:
        service.stop()
        return _listen_failed(exc, args.config)
    grpc = f" and grpc://{service.grpc.address.rsplit(':', 1)[0]}:{service.grpc.port}" if service.grpc else ""
    logging.getLogger("pdp").info("pdp listening on %s://%s%s (policy %s, engine %s)", scheme,
                                  _address(sock), grpc, service.pdp.policy.version, config.policy.engine)
    # SIGHUP re-reads the policy, trust-bundle and JWKS files (it would end the process otherwise);
    # SIGTERM and SIGINT are uvicorn's: stop accepting, answer what is open, stop gRPC with a grace.
    signal.signal(signal.SIGHUP, lambda signum, frame: service.reload_now())
    try:
        uvicorn.Server(service.uvicorn_config(host.strip("[]"), int(port), log_level="warning")).run(
            sockets=[sock])
    finally:
        sock.close()
        service.stop()
    return 0


def _listen_failed(exc: ListenError, config_path: str | None) -> int:
    """One line: which listener cannot have which address, and the setting or flag to change."""
    key = "http" if exc.listener == "HTTP" else "grpc"
    off = "; --grpc '' turns gRPC off" if key == "grpc" else ""
    print(f"pdp: {exc} (change server.{key} in {config_path or 'a config file'} or pass --{key} "
          f"HOST:PORT{off})", file=sys.stderr)
    return EXIT_ERROR


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- check
def _read(path: str) -> bytes:
    return sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()


def _origin_path(value: str) -> str:
    if not value.startswith("/"):
        raise argparse.ArgumentTypeError(f"{value!r} does not start with '/' (a path such as /{value.lstrip('/')})")
    return value


def cmd_check(args: argparse.Namespace) -> int:
    from pdp import reasons
    from pdp.assemble import build_pdp
    from pdp.certificates.pem import PemError, pem_to_der_chain
    from pdp.policy import explain
    from pdp.request import CheckRequest

    if args.input and (args.json or args.explain):
        args.command_parser.error("--input prints the policy's input document alone: leave out --json and --explain")
    config = _config(args.config)
    logging.getLogger("pdp.decisions").disabled = True
    pdp = build_pdp(config)
    headers: dict[str, str] = {}
    for h in args.header:
        name, sep, value = h.partition(":")
        if not sep:
            raise ConfigError("--header", f"{h!r} is not 'Name: value'")
        headers[name.strip().lower()] = value.strip()
    if args.token:
        # With a DPoP proof (--header 'dpop: …') the token goes in the DPoP scheme (RFC 9449 §7.1).
        scheme = "DPoP" if "dpop" in headers else "Bearer"
        headers["authorization"] = f"{scheme} " + _read(args.token).decode("utf-8", "replace").strip()
    chain: tuple[bytes, ...] = ()
    cert_error = None
    if args.cert:
        try:
            chain = pem_to_der_chain(_read(args.cert))
        except PemError as exc:
            cert_error = str(exc)
    request = CheckRequest(method=args.method.upper(), path=args.path, host=args.host, time=time.time(),
                           headers=MappingProxyType(headers), client_cert_chain=chain,
                           client_cert_error=cert_error)
    with explain.recording(pdp.policy) as evaluations:
        decision = pdp.decide(request)
    if args.input:
        if not evaluations:  # denied before the policy: there is no document to show
            print(f"pdp check: no input document: {explain.not_evaluated(decision)}: {decision.message}",
                  file=sys.stderr)
            return EXIT_ERROR if decision.reason == reasons.INTERNAL_ERROR.code else EXIT_DENY
        _print(json.dumps(evaluations[-1].input, indent=2, default=repr))
        return EXIT_ALLOW
    if args.json:
        from pdp.adapters.json_check import render

        rendered = render(decision)
        if args.explain:
            rendered["explain"] = explain.explanation(pdp.policy.bundle, evaluations, decision)
        _print(json.dumps(rendered, indent=2, default=repr))
    else:
        verdict = "ALLOW" if decision.allowed else "DENY"
        _print(f"{verdict} {decision.status} {decision.reason}: {decision.message}")
        _print(f"decision {decision.decision_id}")
        for step in decision.steps:
            _print(f"  {'ok  ' if step.ok else 'FAIL'} {step.name:<10} {step.detail}")
        for name, value in decision.headers.items():
            _print(f"  upstream header {name}: {value}")
        for name, value in decision.response_headers.items():
            _print(f"  response header {name}: {value}")
        if args.explain:
            _print("\n".join(explain.explanation_lines(pdp.policy.bundle, evaluations, decision)))
    if decision.reason == reasons.INTERNAL_ERROR.code:
        return EXIT_ERROR
    return EXIT_ALLOW if decision.allowed else EXIT_DENY


# -- cert inspect
def cmd_cert_inspect(args: argparse.Namespace) -> int:
    from cryptography import x509

    from pdp.certificates.identity import extract_identity
    from pdp.certificates.pem import pem_to_der_chain

    chain = pem_to_der_chain(_read(args.file))
    certs = [x509.load_der_x509_certificate(d) for d in chain]
    verified_by = "not verified (no --config)"
    if args.config:
        from pdp.assemble import build_chain_verifier

        config = _config(args.config)
        verifier = build_chain_verifier(config)  # with an HTTP client: OCSP and CRL distribution points too
        try:
            identity = verifier.verify(chain, time.time())
        finally:
            verifier.close()
        verified_by = f"verified by trust bundle {identity.trust_bundle!r}"
    else:
        identity = extract_identity(certs[0], chain[0], certs, "")
    view = dict(identity.policy_view)
    view.pop("trust_bundle", None)
    view["verification"] = verified_by
    view["chain_length"] = len(chain)
    if args.json:
        _print(json.dumps(view, indent=2))
        return 0
    _print(f"x5t#S256 (RFC 8705): {identity.thumbprint}")
    _print(f"subject:    {identity.subject}")
    _print(f"issuer:     {identity.issuer}")
    _print(f"serial:     {identity.serial}")
    _print(f"valid:      {_iso(identity.not_before)} .. {_iso(identity.not_after)}")
    _print(f"spiffe id:  {identity.spiffe_id or '-'}  (trust domain {identity.trust_domain or '-'})")
    for label, values in (("dns", identity.dns), ("uri", identity.uris), ("email", identity.emails),
                          ("ip", identity.ips)):
        if values:
            _print(f"san {label}:    {', '.join(values)}")
    _print(f"key:        {identity.key_type} {identity.key_size} bits")
    _print(f"chain:      {len(chain)} certificate(s), {verified_by}")
    return 0


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


# -- token inspect
def cmd_token_inspect(args: argparse.Namespace) -> int:
    from pdp.credentials.jose import DecodeError, json_object
    from pdp.credentials.jws import JwsError, parse_compact
    from pdp.errors import Denied

    if args.file == "-" and sys.stdin.isatty():
        print("pdp token inspect: reading a token from standard input (end it with Ctrl-D), or give a FILE",
              file=sys.stderr)
    token = _read(args.file).decode("utf-8", "replace").strip()
    if token.lower().startswith("bearer "):
        token = token[7:].strip()
    try:
        parsed = parse_compact(token)
        claims: Any = json_object(parsed.payload)
    except (JwsError, DecodeError) as exc:
        print(f"not a readable JWS: {exc}", file=sys.stderr)
        return EXIT_DENY
    out: dict[str, Any] = {"header": parsed.header, "claims": claims,
                           "signature": "not checked (give --config to verify against the configured issuers)"}
    ok = True
    if args.config:
        from pdp.assemble import build_key_sources, build_token_verifier

        config = _config(args.config)
        verifier = build_token_verifier(config, build_key_sources(config))
        now = time.time()
        # The signature on its own, so that a well-signed token that has expired says both.
        out["signature"] = _signature(verifier.issuers, parsed, claims, now)
        try:
            verifier.verify(token, now)
            out["verdict"] = "valid (signature and claims verified)"
        except Denied as exc:
            out["verdict"], ok = f"INVALID {exc.reason.code}: {exc.detail}", False
    _print(json.dumps(out, indent=2))
    return 0 if ok else EXIT_DENY


def _signature(issuers: Mapping[str, Issuer], parsed: ParsedJws, claims: Any, now: float) -> str:
    """Whether a configured key of the token's issuer signed it, whatever its claims say."""
    from pdp.credentials.jws import JwsError, verify

    iss = claims.get("iss") if isinstance(claims, dict) else None
    issuer = issuers.get(iss) if isinstance(iss, str) else None
    if issuer is None:
        return f"not checked: issuer {iss!r} is not configured"
    keys = issuer.keys.current()
    if keys is None and issuer.keys.refresh(now):
        keys = issuer.keys.current()
    if keys is None:
        return f"not checked: the keys of issuer {iss!r} cannot be loaded"
    try:
        key = verify(parsed, keys, issuer.algorithms)
    except JwsError as exc:
        return f"BAD: {exc}"
    return f"good (key {key.kid!r} of {iss})" if key.kid else f"good (a key of {iss})"


# -- dev init
def cmd_dev_init(args: argparse.Namespace) -> int:
    from pdp.devinit import curl_examples, dev_init

    target = Path(args.dir)
    try:
        dev_init(target, force=args.force)
    except FileExistsError as exc:
        print(f"pdp dev init: {exc}", file=sys.stderr)
        return EXIT_ERROR
    _print(f"wrote a development setup to {target}/ (CA, client.pem, other.pem, issuer key, jwks.json, "
           f"token.jwt, policy/, pdp.toml)\n")
    command = _pdp_command()
    _print(f"start the service (in the background; the curl calls below wait for it):\n"
           f"  {command} serve --config {target}/pdp.toml &\n")
    _print(f"ask it from the command line:\n  {command} check --config {target}/pdp.toml --cert {target}/client.pem "
           f"--token {target}/token.jwt --method GET --path /orders\n")
    _print(f"a token of your own (pdp dev token -h), with the read scope only, so a POST is denied:\n"
           f"  {command} dev token --dir {target} --scope read --cert {target}/client.pem | {command} check "
           f"--config {target}/pdp.toml --cert {target}/client.pem --token - --method POST --path /orders --explain\n")
    _print(curl_examples(target))
    return 0


# -- dev token, dev proof
def cmd_dev_token(args: argparse.Namespace) -> int:
    from pdp.devinit import AUDIENCE
    from pdp.devtokens import DevToolError, mint, parse_lifetime, parse_scope

    try:
        token = mint(Path(args.dir), scope=parse_scope(args.scope), lifetime=parse_lifetime(args.lifetime),
                     audience=args.audience or AUDIENCE, subject=args.subject, client_id=args.client_id,
                     cert=Path(args.cert) if args.cert else None,
                     dpop_key_file=Path(args.dpop_key) if args.dpop_key else None, expired=args.expired)
    except DevToolError as exc:
        print(f"pdp dev token: {exc}", file=sys.stderr)
        return EXIT_ERROR
    _print(token)
    return 0


def cmd_dev_proof(args: argparse.Namespace) -> int:
    from pdp.devtokens import DevToolError, dpop_key, proof, read_token

    try:
        key = dpop_key(Path(args.dpop_key), create=False)
        token = None
        if args.token:
            try:
                text = _read(args.token).decode("utf-8", "replace")
            except OSError as exc:
                raise DevToolError(f"--token: cannot read {args.token!r}: {exc.strerror or exc}") from None
            token = read_token(text)
        value = proof(key, args.method, args.url, token=token, nonce=args.nonce)
    except DevToolError as exc:
        print(f"pdp dev proof: {exc}", file=sys.stderr)
        return EXIT_ERROR
    _print(value)
    return 0


def _pdp_command() -> str:
    """How this ``pdp`` was started, for commands to paste: ``pdp`` when that is what ``PATH`` finds,
    else the path it was run by (``.venv/bin/pdp``), or ``python -m pdp``."""
    import shlex
    import shutil

    argv0 = Path(sys.argv[0])
    if argv0.name == "__main__.py" or argv0.name != "pdp":
        return f"{shlex.quote(sys.executable)} -m pdp"
    found = shutil.which("pdp")
    if found is not None and Path(found).resolve() == argv0.resolve():
        return "pdp"
    return shlex.quote(str(argv0))


# -- policy test
def cmd_policy_test(args: argparse.Namespace) -> int:
    from pdp.policies import DEFAULT_POLICY_DIR
    from pdp.policy.engine import load_bundle
    from pdp.policy.rego import probe_compile
    from pdp.policy.testing import report, run_tests

    paths = [Path(p) for p in args.paths] or [DEFAULT_POLICY_DIR]
    engine = args.engine or "regorus"
    bundle = load_bundle(paths, entrypoint="data", engine=engine, include_tests=True,
                         rego_version="v0" if args.v0_compatible else "v1")
    try:
        probe_compile(bundle)
    except LoadError as exc:  # regopy only: it is compiled in a child process, which rego-cpp may abort
        uses_with = any(re.search(r"\bwith\s+(input|data)\b", source) for _, source in bundle.modules)
        why = ("cannot run the `with` expressions these tests use" if uses_with
               else f"cannot compile these modules ({exc.message})")
        print(f"pdp policy test: the regopy engine (rego-cpp) {why}; run them on regorus, the default "
              "(pdp policy test without --engine)", file=sys.stderr)
        return EXIT_ERROR
    results = run_tests(bundle)
    try:
        report(results, sys.stdout, verbose=args.verbose)
        sys.stdout.flush()
    except BrokenPipeError:
        _drop_stdout()
    return 0 if results and all(r.outcome == "PASS" for r in results) else EXIT_DENY


# -- policy diff
def cmd_policy_diff(args: argparse.Namespace) -> int:
    """Replay the recorded inputs of --requests through OLD and NEW: 0 none differ, 1 some do, 2 error."""
    from pdp.assemble import checked_engine
    from pdp.policy.diff import replay
    from pdp.policy.engine import PolicyEngine, load_bundle

    def engine(name: str, path: str) -> PolicyEngine | None:
        try:
            bundle = load_bundle([Path(path)], entrypoint=args.decision, engine=args.engine, key=name,
                                 data_files=[Path(d) for d in args.data], rego_version=args.rego_version)
            return checked_engine(bundle, probe=True, name=name, divergence_mode=args.divergence, cache_size=10_000)
        except ConfigError as exc:
            print(f"pdp policy diff: {name} ({path}): {exc.message}", file=sys.stderr)
            return None

    old, new = engine("OLD", args.old), engine("NEW", args.new)
    if old is None or new is None:
        return EXIT_ERROR
    try:
        stream = sys.stdin if args.requests == "-" else open(args.requests, encoding="utf-8",
                                                                 errors="replace")
    except OSError as exc:
        print(f"pdp policy diff: --requests {args.requests}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR
    try:
        counts = replay(old, new, stream, _print)
    except OSError as exc:
        print(f"pdp policy diff: --requests {args.requests}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        if stream is not sys.stdin:
            stream.close()
    skipped = f"; {counts.skipped} line(s) skipped (not an input)" if counts.skipped else ""
    _print(f"{counts.replayed} input(s) replayed: {counts.different} differ, "
           f"{counts.replayed - counts.different} the same{skipped} (old {old.version}, new {new.version})")
    if counts.replayed == 0:
        print(f"pdp policy diff: --requests {args.requests}: no recorded input to replay", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_DENY if counts.different else 0


# -- config check
def cmd_config_check(args: argparse.Namespace) -> int:
    """Load everything ``pdp serve`` would load from FILE (policy, trust bundles, JWKS and key files),
    without binding a listener or opening a store: 0 and a summary, or 2 and the key at fault."""
    from pdp.assemble import build_pdp
    from pdp.config import load_config
    from pdp.store import MemoryStore

    setup_logging("warning")  # a policy loaded with divergence = "warn" says what it let through
    try:
        config = load_config(Path(args.file))
        _check_key_files(config)
        pdp = build_pdp(config, store=MemoryStore())
    except ConfigError as exc:
        print(f"pdp config check: {args.file}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    try:
        bundles = [b.name for b in pdp.certificates.bundles]
        issuers = [i.issuer for i in config.tokens.issuers]
        _print(f"ok: {args.file}: policy {pdp.policy.version} (engine {config.policy.engine}), "
               f"{len(bundles)} trust bundle(s){_listed(bundles)}, {len(issuers)} issuer(s){_listed(issuers)}")
    finally:
        pdp.close()
    return 0


def _listed(names: list[str]) -> str:
    return f" ({', '.join(names)})" if names else ""


def _check_key_files(config: Config) -> None:
    """Read the certificate and key files ``pdp serve`` hands to TLS as TLS will (the config loader only
    checks that the listener's exist); an error names the key that names the file."""
    import ssl

    tls = config.server.tls
    if tls is not None:
        _tls_pair(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), "server.tls", "cert", tls.cert, "key", tls.key)
        if tls.client_ca is not None:
            _tls_cas("server.tls.client_ca", tls.client_ca)
    for i, iss in enumerate(config.tokens.issuers):
        key = f"tokens.issuers[{i}]"
        if iss.introspection_client_cert is not None:
            _tls_pair(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), key, "introspection_client_cert",
                      iss.introspection_client_cert, "introspection_client_key", iss.introspection_client_key)
        if iss.introspection_ca is not None:
            _tls_cas(f"{key}.introspection_ca", iss.introspection_ca)


def _tls_pair(context: Any, table: str, cert_key: str, cert: Path, key_key: str, key: Path | None) -> None:
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    certs = _pem_file(f"{table}.{cert_key}", cert, x509.load_pem_x509_certificates)
    if not certs:
        raise ConfigError(f"{table}.{cert_key}", f"{str(cert)!r} holds no certificate")
    # The key on its own first: an encrypted key would make OpenSSL ask for a pass phrase on the terminal.
    _pem_file(f"{table}.{key_key}" if key else f"{table}.{cert_key}", key or cert,
              lambda data: serialization.load_pem_private_key(data, None))
    try:
        context.load_cert_chain(str(cert), str(key) if key else None)
    except ssl.SSLError as exc:
        raise ConfigError(f"{table}.{key_key}", f"{str(key or cert)!r} is not the key of {str(cert)!r}: "
                                                f"{exc.reason or exc}") from exc


def _tls_cas(name: str, path: Path) -> None:
    from cryptography import x509

    if not _pem_file(name, path, x509.load_pem_x509_certificates):
        raise ConfigError(name, f"{str(path)!r} holds no certificate")


def _pem_file(name: str, path: Path, load: Callable[[bytes], Any]) -> Any:
    try:
        return load(path.read_bytes())
    except OSError as exc:
        raise ConfigError(name, f"cannot read {str(path)!r}: {exc.strerror or exc}") from exc
    except (ValueError, TypeError) as exc:  # TypeError: an encrypted key (pdp takes no pass phrase)
        raise ConfigError(name, f"{str(path)!r}: {exc}") from exc


# -- revoke, unrevoke, certs: pdp's revocation list and the identity inventory, in the shared store
# -- bench
def cmd_bench(args: argparse.Namespace) -> int:
    from pdp.bench.run import main as bench

    return bench(args)


def build_parser() -> argparse.ArgumentParser:
    from pdp import __version__, store_commands

    parser = argparse.ArgumentParser(prog="pdp", description="A zero-trust policy decision point.")
    parser.add_argument("--version", action="version", version=f"pdp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("serve", help="run the decision service")
    p.add_argument("--config", help="the TOML config file (default: embedded defaults)")
    p.add_argument("--http", help="HOST:PORT to listen on (overrides server.http)")
    p.add_argument("--grpc", help="HOST:PORT for Envoy's gRPC ext_authz (overrides server.grpc; '' turns it off)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--workers", type=int, default=1, help="processes serving the same ports (default 1)")
    p.set_defaults(func=cmd_serve, command_parser=p)

    p = sub.add_parser("check", help="decide on one request given as files; exit 0 allow, 1 deny, 2 error")
    p.add_argument("--config", help="the TOML config file")
    p.add_argument("--cert", help="client certificate chain (PEM, leaf first; - for stdin)")
    p.add_argument("--token", help="file holding the access token (- for stdin); sent as 'Bearer', or as 'DPoP' "
                                  "when a DPoP proof is given (--header 'dpop: PROOF')")
    p.add_argument("--method", default="GET")
    p.add_argument("--path", default="/", type=_origin_path, help="the request path, with its query (default /)")
    p.add_argument("--host", default="", help="the request's host (DPoP proofs name it: https://HOST/PATH)")
    p.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'")
    p.add_argument("--json", action="store_true", help="print the decision as JSON")
    p.add_argument("--input", action="store_true",
                   help="print the input document the policy is evaluated on for this request (JSON), whatever "
                        "it decides: exit 0; 1 when pdp denies before the policy runs (an invalid credential: "
                        "no document, the reason on stderr)")
    p.add_argument("--explain", action="store_true",
                   help="also show the policy step: its answer (reason, scope), the input paths it reads with "
                        "their values, and on regorus the policy lines evaluated (coverage: a line listed was "
                        "evaluated, whether it held or not; the answer names the rule that decided, the lines "
                        "cannot)")
    p.set_defaults(func=cmd_check, command_parser=p)

    cert = sub.add_parser("cert", help="certificate tools").add_subparsers(dest="cert_command", required=True)
    p = cert.add_parser("inspect", help="identity and RFC 8705 thumbprint of a PEM certificate")
    p.add_argument("file")
    p.add_argument("--config", help="also verify the chain against the configured trust bundles")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cert_inspect, command_parser=p)

    tok = sub.add_parser("token", help="token tools").add_subparsers(dest="token_command", required=True)
    p = tok.add_parser("inspect", help="header and claims of a JWT, with its signature status")
    p.add_argument("file", nargs="?", default="-")
    p.add_argument("--config", help="verify against the configured issuers")
    p.set_defaults(func=cmd_token_inspect, command_parser=p)

    dev = sub.add_parser("dev", help="development helpers").add_subparsers(dest="dev_command", required=True)
    p = dev.add_parser("init", help="write a working dev setup (PKI, issuer, token, policy, config)")
    p.add_argument("dir")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(func=cmd_dev_init, command_parser=p)
    p = dev.add_parser("token", help="print an access token of the dev issuer (only the token: $(pdp dev token))",
                       description="Print an access token (RFC 9068) signed by the issuer `pdp dev init DIR` wrote. "
                                   "Without --cert or --dpop-key it is unbound, which the dev setup refuses "
                                   "(token_unbound). Errors: one line naming the option or file, exit 2.")
    p.add_argument("--dir", default="dev", help="the folder `pdp dev init` wrote (default: dev)")
    p.add_argument("--scope", default="read write", help="space-separated scopes (default: 'read write')")
    p.add_argument("--lifetime", default="1h", metavar="DURATION",
                   help="how long it is valid: 90s, 15m, 1h, 7d, 2w (default: 1h)")
    p.add_argument("--audience", help="the aud claim (default: the dev config's audience)")
    p.add_argument("--subject", default="demo-user", help="the sub claim (default: demo-user)")
    p.add_argument("--client-id", default="demo-client", help="the client_id claim (default: demo-client)")
    p.add_argument("--cert", metavar="FILE",
                   help="bind it to the client certificate in this PEM file (RFC 8705 cnf.x5t#S256)")
    p.add_argument("--dpop-key", metavar="FILE",
                   help="bind it to the DPoP key in this private JWK file, created (mode 0600) when missing "
                        "(RFC 9449 cnf.jkt)")
    p.add_argument("--expired", action="store_true", help="a token that expired an hour ago")
    p.set_defaults(func=cmd_dev_token, command_parser=p)
    p = dev.add_parser("proof", help="print a DPoP proof (RFC 9449) for a request")
    p.add_argument("method", metavar="METHOD", help="the request's method (GET)")
    p.add_argument("url", metavar="URL", help="the request's URL (https://api.example.org/orders); query and "
                                              "fragment are left out of the proof")
    p.add_argument("--dpop-key", required=True, metavar="FILE",
                   help="the private JWK file of the DPoP key (pdp dev token --dpop-key FILE creates it)")
    p.add_argument("--token", metavar="FILE",
                   help="file holding the access token the proof goes with (- for stdin): adds ath")
    p.add_argument("--nonce", help="the server's nonce (its DPoP-Nonce header)")
    p.set_defaults(func=cmd_dev_proof, command_parser=p)

    pol = sub.add_parser("policy", help="policy tools").add_subparsers(dest="policy_command", required=True)
    p = pol.add_parser("test", help="run test_ rules, like `opa test`")
    p.add_argument("paths", nargs="*", help="policy folders or files (default: the shipped policy)")
    p.add_argument("--engine", choices=["regopy", "regorus"])
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--v0-compatible", action="store_true",
                   help="read the modules as Rego v0, as opa test --v0-compatible")
    p.set_defaults(func=cmd_policy_test, command_parser=p)
    p = pol.add_parser("diff", help="replay recorded inputs through two policies; exit 0 none differ, 1 some "
                                    "do, 2 error")
    p.add_argument("old", metavar="OLD", help="the policy in force: a folder or a .rego file")
    p.add_argument("new", metavar="NEW", help="the policy to compare: a folder or a .rego file")
    p.add_argument("--requests", required=True, metavar="FILE",
                   help="JSON lines: input documents, or decision lines with an 'input' member "
                        "(log.include_input = true); - for stdin")
    p.add_argument("--data", action="append", default=[], metavar="FILE", help="a JSON data document for both")
    p.add_argument("--decision", default="pdp/authz/result", help="the entrypoint (default pdp/authz/result)")
    p.add_argument("--engine", choices=["regopy", "regorus"], default="regorus")
    p.add_argument("--rego-version", choices=["v1", "v0"], default="v1")
    p.add_argument("--divergence", choices=["refuse", "warn"], default="refuse",
                   help="constructs regorus reads otherwise than OPA: refuse the policy (default), or warn")
    p.set_defaults(func=cmd_policy_diff, command_parser=p)

    conf = sub.add_parser("config", help="configuration tools").add_subparsers(dest="config_command", required=True)
    p = conf.add_parser("check", help="load a config as `pdp serve` would, without listening; exit 0 ok, 2 error")
    p.add_argument("file", help="the TOML config file")
    p.set_defaults(func=cmd_config_check, command_parser=p)

    store_commands.add_parsers(sub)

    p = sub.add_parser("bench", help="measure pdp against bare servers and raw operations on loopback")
    p.add_argument("--quick", action="store_true", help="small counts, one round: well under a minute")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3; --quick 1)")
    p.add_argument("--seconds", type=int, help="length of each load run (default 5; --quick 1)")
    p.add_argument("--rates", help="fixed offered rates in req/s, comma-separated (default 500,1000,2000)")
    p.add_argument("--out", help="folder for bench.json and bench.png (default: a new temporary folder)")
    p.add_argument("--json", help="write the JSON here instead (default OUT/bench.json)")
    p.set_defaults(func=cmd_bench, command_parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command is None:  # bare `pdp`: what it can do, rather than a one-line usage error
        parser.print_help()
        return EXIT_ERROR
    if unknown:  # the usage of the command that was given (`pdp serve --bogus`), not the top level's
        command_parser: argparse.ArgumentParser = args.command_parser
        command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    result = EXIT_ERROR
    try:
        result = args.func(args)
    except BrokenPipeError:  # the reader of standard output has gone before the command could finish
        _drop_stdout()
    except ConfigError as exc:
        print(f"pdp: configuration error: {exc}", file=sys.stderr)
    except (OSError, PdpError, ValueError) as exc:
        print(f"pdp: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _drop_stdout()
    return result


if __name__ == "__main__":
    sys.exit(main())
