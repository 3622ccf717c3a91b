"""The commands on the state pdp replicas share (``store.url``): ``pdp revoke``, ``pdp unrevoke``,
``pdp revoke list`` and ``pdp certs list``. They write to and read the store a running pdp uses; without
``store.url`` there is none to reach, and they say so."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pdp.cli import EXIT_DENY, EXIT_ERROR, _config, _iso, _print


def _shared_store(config_path: str, command: str) -> Any:
    """The store a running pdp shares (``store.url``), or None after saying why this command cannot reach
    one: without ``store.url`` each pdp keeps this state in its own memory."""
    from pdp.assemble import build_store

    config = _config(config_path)
    if not config.store.url:
        print(f"pdp {command}: store.url is not set in {config_path}: a running pdp keeps this state in its own "
              "memory, out of this command's reach. Use the admin endpoint of the running pdp (server.admin) or "
              "configure a shared store (store.url); nothing was changed.", file=sys.stderr)
        return None
    return build_store(config)


def _duration(value: str) -> float:
    from pdp.durations import parse_duration

    try:
        return parse_duration(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _revocation_value(kind: str, value: str) -> str:
    """A certificate may be named by its PEM file: the x5t#S256 thumbprint of the one certificate in it that
    is not a CA (a chain file may be written CA first; a CA's thumbprint is never a client's) is revoked.
    A file with no such certificate, or more than one, is refused: which one is meant is not guessed."""
    from pdp.certificates.revocation_list import RevocationError, normalize

    if kind == "cert" and Path(value).is_file():
        from cryptography import x509

        from pdp.certificates.pem import pem_to_der_chain
        from pdp.credentials.rfc8705 import thumbprint

        def is_ca(der: bytes) -> bool:
            try:
                return bool(x509.load_der_x509_certificate(der).extensions.get_extension_for_class(
                    x509.BasicConstraints).value.ca)
            except x509.ExtensionNotFound:
                return False

        leaves = [der for der in pem_to_der_chain(Path(value).read_bytes()) if not is_ca(der)]
        if len(leaves) != 1:
            raise RevocationError(f"{value} holds {len(leaves)} certificates that are not CAs (BasicConstraints "
                                  "ca=false): name the one to revoke by its thumbprint (pdp cert inspect FILE)")
        return thumbprint(leaves[0])
    return normalize(kind, value)


def _store_command(command: str, run: Callable[[], int]) -> int:
    from pdp.certificates.revocation_list import RevocationError
    from pdp.store import StoreUnavailable

    try:
        return run()
    except StoreUnavailable as exc:
        print(f"pdp {command}: the shared store did not answer ({exc}); nothing was changed", file=sys.stderr)
    except RevocationError as exc:
        print(f"pdp {command}: {exc}", file=sys.stderr)
    return EXIT_ERROR


def cmd_revoke(args: argparse.Namespace) -> int:
    import getpass

    from pdp.certificates.revocation_list import Revocation, store_revocation

    store = _shared_store(args.config, "revoke")
    if store is None:
        return EXIT_ERROR

    def run() -> int:
        now = time.time()
        value = _revocation_value(args.kind, args.value)
        try:
            user = getpass.getuser()
        except (KeyError, OSError):  # a container's uid with no name
            user = f"uid {os.getuid()}"
        entry = Revocation(args.kind, value, reason=args.reason, created=now,
                           expires=now + args.ttl if args.ttl else None,
                           by=f"{user}@{socket.gethostname()} (pdp revoke)")
        entry = store_revocation(store, entry)  # checks the reason; keeps a later expiry already in force
        until = f"until {_iso(entry.expires)}" if entry.expires is not None else "permanently"
        _print(f"revoked {args.kind} {value} {until}: every pdp sharing this store denies it within a second")
        return 0

    return _store_command("revoke", run)


def cmd_unrevoke(args: argparse.Namespace) -> int:
    from pdp.certificates.revocation_list import remove_revocation

    store = _shared_store(args.config, "unrevoke")
    if store is None:
        return EXIT_ERROR

    def run() -> int:
        value = _revocation_value(args.kind, args.value)
        if not remove_revocation(store, args.kind, value):
            print(f"pdp unrevoke: {args.kind} {value} is not on the revocation list", file=sys.stderr)
            return EXIT_DENY
        _print(f"removed {args.kind} {value} from the revocation list")
        return 0

    return _store_command("unrevoke", run)


def cmd_revoke_list(args: argparse.Namespace) -> int:
    from pdp.certificates.revocation_list import RevocationList, read_revocations

    store = _shared_store(args.config, "revoke list")
    if store is None:
        return EXIT_ERROR

    def run() -> int:
        now = time.time()
        version, entries = read_revocations(store)
        current = RevocationList(entries, version=version, now=now).entries(now)
        if args.json:
            _print(json.dumps([e.view() for e in current], indent=2, allow_nan=False))
            return 0
        _print(f"{'KIND':<8} {'VALUE':<46} {'EXPIRES':<20} {'REVOKED BY':<30} REASON")
        for e in current:
            expires = _iso(e.expires) if e.expires is not None else "never"
            _print(f"{e.kind:<8} {e.value:<46} {expires:<20} {e.by[:30]:<30} {e.reason}")
        return 0

    return _store_command("revoke list", run)


def cmd_certs_list(args: argparse.Namespace) -> int:
    from pdp.certificates.inventory import expiring, read_records

    store = _shared_store(args.config, "certs list")
    if store is None:
        return EXIT_ERROR

    def run() -> int:
        now = time.time()
        by = now + args.expiring if args.expiring is not None else None
        records = expiring(read_records(store, expiring_by=by), now, args.expiring)
        if args.json:
            _print(json.dumps([r.view() for r in records], indent=2, allow_nan=False))
            return 0
        lines = [f"{'NOT AFTER':<20} {'DAYS':>6} {'SPIFFE ID / SUBJECT':<48} {'TRUST BUNDLE':<16} "
                 f"{'LAST SEEN':<20} THUMBPRINT"]
        for r in records:
            lines.append(f"{_iso(r.not_after):<20} {(r.not_after - now) / 86400:>6.1f} "
                         f"{(r.spiffe_id or r.subject)[:48]:<48} {r.trust_bundle[:16]:<16} "
                         f"{_iso(r.last_seen):<20} {r.thumbprint}")
        _print("\n".join(lines))
        return 0

    return _store_command("certs list", run)


def add_parsers(sub: Any) -> None:
    """Add ``revoke``, ``unrevoke`` and ``certs`` to the subcommands ``sub`` of ``pdp``."""
    # A base64url thumbprint may begin with '-': written after '--' it is never taken for an option.
    kinds = (("cert", "PEM_FILE|THUMBPRINT", "a client certificate (its PEM file, x5t#S256 or SHA-256 fingerprint; "
                                             "one that begins with '-' goes after '--')"),
             ("token", "JTI", "an access token, by its jti claim"),
             ("subject", "SPIFFE_ID", "a client identity: its certificates' SPIFFE ID and its tokens' sub"))
    rev = sub.add_parser("revoke", help="deny a certificate, token or subject on every pdp at once").add_subparsers(
        dest="revoke_command", required=True)
    unrev = sub.add_parser("unrevoke", help="take an entry off the revocation list").add_subparsers(
        dest="unrevoke_command", required=True)
    for kind, metavar, what in kinds:
        p = rev.add_parser(kind, help=f"revoke {what}")
        p.add_argument("value", metavar=metavar)
        p.add_argument("--config", required=True, help="the TOML config file (its store.url is written to)")
        p.add_argument("--reason", default="", help="why, for the list and the logs")
        p.add_argument("--ttl", type=_duration, help="how long (90s, 15m, 1h, 7d, 2w); without it, permanently")
        p.set_defaults(func=cmd_revoke, command_parser=p, kind=kind)
        p = unrev.add_parser(kind, help=f"take {what} off the list")
        p.add_argument("value", metavar=metavar)
        p.add_argument("--config", required=True, help="the TOML config file (its store.url is written to)")
        p.set_defaults(func=cmd_unrevoke, command_parser=p, kind=kind)
    p = rev.add_parser("list", help="the revocation list in force")
    p.add_argument("--config", required=True, help="the TOML config file (its store.url is read)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_revoke_list, command_parser=p)

    certs = sub.add_parser("certs", help="the inventory of client identities pdp has verified").add_subparsers(
        dest="certs_command", required=True)
    p = certs.add_parser("list", help="client certificates seen, by notAfter")
    p.add_argument("--config", required=True, help="the TOML config file (its store.url is read)")
    p.add_argument("--expiring", type=_duration, metavar="DURATION",
                   help="only those expiring within DURATION (7d), the expired included")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_certs_list, command_parser=p)
