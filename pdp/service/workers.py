"""``pdp serve --workers N``: N processes on one HTTP port and one gRPC port, and what they share.

Each worker has its own ``Service`` (the GIL and the regorus engines stay per process, and so do caches
and metrics). What the workers must agree on they share: the DPoP nonce secret and, without
``store.url``, a store on this machine (a SQLite file in a private folder this process makes, holds
open and removes), so that a DPoP proof is accepted once by all of them (RFC 9449 §11.1) and failed
introspection secrets are counted by all of them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import stat
import tempfile
from pathlib import Path

import uvicorn
from uvicorn.supervisors import Multiprocess

from pdp.config import Config
from pdp.service.server import WORKER_CONFIG_ENV, Service, uvicorn_options
from pdp.store import LOCKOUT_TABLE, SHARED_TABLE, SqliteStore


def serve_workers(config: Config, config_path: str | None, host: str, port: int, scheme: str, *, workers: int,
                  log_level: str) -> int:
    """N processes on one HTTP port (uvicorn's workers) and one gRPC port (SO_REUSEPORT), each with its own
    Service: the GIL and regorus engines stay per process. Each has its own caches and metrics.

    What the workers must share, they share: the DPoP nonce secret (drawn here unless configured, handed
    over in the environment, never written anywhere) and, without ``store.url``, the store, so that a
    DPoP proof is accepted once by all of them (RFC 9449 §11.1): a SQLite file in a private folder made
    here, held open while the server runs (workers open this very file, never a new one) and removed when
    it stops. Workers stop when this process is gone; folders left by one that was killed are removed
    by the next."""
    Service(config).pdp.close()  # fail here, in the parent, on a config or policy that will not load
    remove_stale_state(Path(tempfile.gettempdir()))
    state_dir = None if config.store.url else Path(tempfile.mkdtemp(prefix=STATE_PREFIX))  # mode 0700
    stores: list[SqliteStore] = []
    try:
        store_path, identity = "", None
        if state_dir is not None:
            (state_dir / STATE_OWNER).write_text(json.dumps(
                {"owner": STATE_MARK, "pid": os.getpid(), "started": _process_started(os.getpid())}))
            store_path = str(state_dir / "state.sqlite3")
            stores = [SqliteStore(Path(store_path), table=LOCKOUT_TABLE),
                      SqliteStore(Path(store_path), table=SHARED_TABLE)]  # the schema, before any worker
            identity = stores[0].file_identity()
        os.environ[WORKER_CONFIG_ENV] = json.dumps({
            "config": str(Path(config_path).resolve()) if config_path else "",
            "http": config.server.http, "grpc": config.server.grpc, "log_level": log_level,
            "nonce_secret": config.dpop.nonce_secret.hex(), "store": store_path, "store_identity": identity,
            "parent_pid": os.getpid()})
        logging.getLogger("pdp").info("pdp listening on %s://%s:%d with %d workers (engine %s, shared state in %s)",
                                      scheme, host, port, workers, config.policy.engine,
                                      "store.url" if state_dir is None else state_dir)
        server_config = uvicorn.Config("pdp.service.server:worker_app", factory=True, host=host, port=port,
                                       workers=workers, log_level="warning", **uvicorn_options(config))
        sock = server_config.bind_socket()
        # Accepted connections inherit this: without it, a socket shared with worker processes answered
        # each request 40 ms late (Nagle against the client's delayed ACK).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        Multiprocess(server_config, sockets=[sock]).run()
    finally:
        os.environ.pop(WORKER_CONFIG_ENV, None)
        for store in stores:
            store.close()
        if state_dir is not None:
            shutil.rmtree(state_dir, ignore_errors=True)
    return 0


#: The private state folders of ``pdp serve --workers``, and the file in each that names its owner.
STATE_PREFIX, STATE_OWNER, STATE_MARK = "pdp-workers-", "owner.json", "pdp serve --workers"


def _process_started(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, Linux), to tell it from a later one with its pid."""
    try:
        line = Path(f"/proc/{pid}/stat").read_text()
        return int(line[line.rindex(")") + 2:].split()[19])  # field 22; the name in () may hold spaces
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int, started: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive, and not the owner we look for
    return started is None or _process_started(pid) in (started, None)


def remove_stale_state(folder: Path) -> list[Path]:
    """Remove the state folders that ``pdp serve --workers`` parents killed without a chance to clean up
    left in ``folder``; the ones removed. Only what is provably pdp's and dead goes: a directory (not a
    link) of this user, private, named ``pdp-workers-*``, whose owner file names a process that is gone."""
    removed = []
    for path in folder.glob(STATE_PREFIX + "*"):
        try:
            st = path.lstat()
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
                continue
            owner = json.loads((path / STATE_OWNER).read_text())
            pid, started = owner["pid"], owner.get("started")
            if owner.get("owner") != STATE_MARK or not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 \
                    or not (started is None or isinstance(started, int)) or pid == os.getpid() \
                    or _alive(pid, started):
                continue
        except (OSError, ValueError, KeyError, TypeError):
            continue
        shutil.rmtree(path, ignore_errors=True)
        logging.getLogger("pdp").info("removed %s, left by pdp serve process %d, which is gone", path, pid)
        removed.append(path)
    return removed
