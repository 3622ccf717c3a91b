"""The ``pdp`` command: serve, check, inspect certificates and tokens, write a dev setup, test policies."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pdp.errors import ConfigError, PdpError
from pdp.service.decision_log import setup_logging

EXIT_ALLOW, EXIT_DENY, EXIT_ERROR = 0, 1, 2


def _config(path: str | None) -> Any:
    from pdp.config import Config, load_config

    return load_config(Path(path)) if path else Config.defaults()


# -- serve
def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from pdp.service.server import Service

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

        return serve_workers(config, args.config, host.strip("[]"), int(port), scheme, workers=args.workers,
                             log_level=args.log_level or config.log.level)
    service = Service(config)
    logging.getLogger("pdp").info("pdp listening on %s://%s (policy %s, engine %s)", scheme, listen,
                                  service.pdp.policy.version, config.policy.engine)
    uvicorn.Server(service.uvicorn_config(host.strip("[]"), int(port), log_level="warning")).run()
    return 0


# -- check
def _read(path: str) -> bytes:
    return sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()


def cmd_check(args: argparse.Namespace) -> int:
    from pdp import reasons
    from pdp.assemble import build_pdp
    from pdp.certificates.pem import PemError, pem_to_der_chain
    from pdp.request import CheckRequest

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
        headers["authorization"] = "Bearer " + _read(args.token).decode("utf-8", "replace").strip()
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
    decision = pdp.decide(request)
    if args.json:
        from pdp.adapters.json_check import render

        print(json.dumps(render(decision), indent=2))
    else:
        verdict = "ALLOW" if decision.allowed else "DENY"
        print(f"{verdict} {decision.status} {decision.reason}: {decision.message}")
        print(f"decision {decision.decision_id}")
        for step in decision.steps:
            print(f"  {'ok  ' if step.ok else 'FAIL'} {step.name:<10} {step.detail}")
        for name, value in decision.headers.items():
            print(f"  upstream header {name}: {value}")
        for name, value in decision.response_headers.items():
            print(f"  response header {name}: {value}")
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
        from pdp.assemble import load_trust
        from pdp.certificates.trust import ChainVerifier

        config = _config(args.config)
        verifier = ChainVerifier(load_trust(config), max_chain_depth=config.certificates.max_chain_depth)
        identity = verifier.verify(chain, time.time())
        verified_by = f"verified by trust bundle {identity.trust_bundle!r}"
    else:
        identity = extract_identity(certs[0], chain[0], certs, "")
    view = dict(identity.policy_view)
    view.pop("trust_bundle", None)
    view["verification"] = verified_by
    view["chain_length"] = len(chain)
    if args.json:
        print(json.dumps(view, indent=2))
        return 0
    print(f"x5t#S256 (RFC 8705): {identity.thumbprint}")
    print(f"subject:    {identity.subject}")
    print(f"issuer:     {identity.issuer}")
    print(f"serial:     {identity.serial}")
    print(f"valid:      {_iso(identity.not_before)} .. {_iso(identity.not_after)}")
    print(f"spiffe id:  {identity.spiffe_id or '-'}  (trust domain {identity.trust_domain or '-'})")
    for label, values in (("dns", identity.dns), ("uri", identity.uris), ("email", identity.emails),
                          ("ip", identity.ips)):
        if values:
            print(f"san {label}:    {', '.join(values)}")
    print(f"key:        {identity.key_type} {identity.key_size} bits")
    print(f"chain:      {len(chain)} certificate(s), {verified_by}")
    return 0


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


# -- token inspect
def cmd_token_inspect(args: argparse.Namespace) -> int:
    from pdp.credentials.jose import DecodeError, json_object
    from pdp.credentials.jws import JwsError, parse_compact
    from pdp.errors import Denied

    token = _read(args.file).decode("utf-8", "replace").strip()
    if token.lower().startswith("bearer "):
        token = token[7:].strip()
    try:
        parsed = parse_compact(token)
        claims: Any = json_object(parsed.payload)
    except (JwsError, DecodeError) as exc:
        print(f"not a readable JWS: {exc}", file=sys.stderr)
        return EXIT_DENY
    status = "not checked (give --config to verify against the configured issuers)"
    ok = True
    if args.config:
        from pdp.assemble import build_key_sources, build_token_verifier

        config = _config(args.config)
        verifier = build_token_verifier(config, build_key_sources(config))
        try:
            verifier.verify(token, time.time())
            status = "valid (signature and claims verified)"
        except Denied as exc:
            status, ok = f"INVALID {exc.reason.code}: {exc.detail}", False
    out = {"header": parsed.header, "claims": claims, "signature": status}
    print(json.dumps(out, indent=2))
    return 0 if ok else EXIT_DENY


# -- dev init
def cmd_dev_init(args: argparse.Namespace) -> int:
    from pdp.devinit import curl_examples, dev_init

    target = Path(args.dir)
    try:
        dev_init(target, force=args.force)
    except FileExistsError as exc:
        print(f"pdp dev init: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(f"wrote a development setup to {target}/ (CA, client.pem, other.pem, issuer key, jwks.json, "
          f"token.jwt, policy/, pdp.toml)\n")
    print(f"start the service:\n  pdp serve --config {target}/pdp.toml\n")
    print(f"ask it from the command line:\n  pdp check --config {target}/pdp.toml --cert {target}/client.pem "
          f"--token {target}/token.jwt --method GET --path /orders\n")
    print(curl_examples(target))
    return 0


# -- policy test
def cmd_policy_test(args: argparse.Namespace) -> int:
    from pdp.policies import DEFAULT_POLICY_DIR
    from pdp.policy.engine import load_bundle
    from pdp.policy.rego import probe_compile
    from pdp.policy.testing import report, run_tests

    paths = [Path(p) for p in args.paths] or [DEFAULT_POLICY_DIR]
    engine = args.engine or "regorus"
    bundle = load_bundle(paths, entrypoint="data", engine=engine, include_tests=True)
    probe_compile(bundle)
    ok = report(run_tests(bundle), sys.stdout, verbose=args.verbose)
    return 0 if ok else EXIT_DENY


# -- bench
def cmd_bench(args: argparse.Namespace) -> int:
    from pdp.bench.run import main as bench

    return bench(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdp", description="A zero-trust policy decision point.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the decision service")
    p.add_argument("--config", help="the TOML config file (default: embedded defaults)")
    p.add_argument("--http", help="HOST:PORT to listen on (overrides server.http)")
    p.add_argument("--grpc", help="HOST:PORT for Envoy's gRPC ext_authz (overrides server.grpc; '' turns it off)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--workers", type=int, default=1, help="processes serving the same ports (default 1)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check", help="decide on one request given as files; exit 0 allow, 1 deny, 2 error")
    p.add_argument("--config", help="the TOML config file")
    p.add_argument("--cert", help="client certificate chain (PEM, leaf first; - for stdin)")
    p.add_argument("--token", help="file holding the access token (- for stdin)")
    p.add_argument("--method", default="GET")
    p.add_argument("--path", default="/")
    p.add_argument("--host", default="")
    p.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'")
    p.add_argument("--json", action="store_true", help="print the decision as JSON")
    p.set_defaults(func=cmd_check)

    cert = sub.add_parser("cert", help="certificate tools").add_subparsers(dest="cert_command", required=True)
    p = cert.add_parser("inspect", help="identity and RFC 8705 thumbprint of a PEM certificate")
    p.add_argument("file")
    p.add_argument("--config", help="also verify the chain against the configured trust bundles")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cert_inspect)

    tok = sub.add_parser("token", help="token tools").add_subparsers(dest="token_command", required=True)
    p = tok.add_parser("inspect", help="header and claims of a JWT, with its signature status")
    p.add_argument("file", nargs="?", default="-")
    p.add_argument("--config", help="verify against the configured issuers")
    p.set_defaults(func=cmd_token_inspect)

    dev = sub.add_parser("dev", help="development helpers").add_subparsers(dest="dev_command", required=True)
    p = dev.add_parser("init", help="write a working dev setup (PKI, issuer, token, policy, config)")
    p.add_argument("dir")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(func=cmd_dev_init)

    pol = sub.add_parser("policy", help="policy tools").add_subparsers(dest="policy_command", required=True)
    p = pol.add_parser("test", help="run test_ rules, like `opa test`")
    p.add_argument("paths", nargs="*", help="policy folders or files (default: the shipped policy)")
    p.add_argument("--engine", choices=["regopy", "regorus"])
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_policy_test)

    p = sub.add_parser("bench", help="measure pdp against bare servers and raw operations on loopback")
    p.add_argument("--quick", action="store_true", help="small counts, one round: well under a minute")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3; --quick 1)")
    p.add_argument("--seconds", type=int, help="length of each load run (default 5; --quick 1)")
    p.add_argument("--rates", help="fixed offered rates in req/s, comma-separated (default 500,1000,2000)")
    p.add_argument("--out", help="folder for bench.json and bench.png (default: a new temporary folder)")
    p.add_argument("--json", help="write the JSON here instead (default OUT/bench.json)")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except ConfigError as exc:
        print(f"pdp: configuration error: {exc}", file=sys.stderr)
    except (OSError, PdpError, ValueError) as exc:
        print(f"pdp: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
