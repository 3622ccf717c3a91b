"""``pdp serve --workers N``: N processes on one HTTP port and one gRPC port, and what they share.

Each worker has its own ``Service`` (the GIL and the regorus engines stay per process, and so do
caches). What the workers must agree on they share: the DPoP nonce secret and, without
``store.url``, a store on this machine (a SQLite file in a private folder this process makes, holds
open and removes), so that a DPoP proof is accepted once by all of them (RFC 9449 §11.1) and failed
introspection secrets are counted by all of them, with the secret that authenticates the introspection
answers they share there (``store.secret`` if configured, else drawn here). Their metrics are kept in
files in a private folder of their own, made, marked and removed the same way (prometheus_client's
multiprocess mode), so a scrape of ``/metrics``, whichever worker answers it, reports all of them
together; the gauges of a worker that is gone are dropped.
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
from pdp.credentials.shared_introspection import MIN_SECRET_BYTES
from pdp.service.grpc_listener import check_bindable
from pdp.service.metrics import MULTIPROCESS_ENV, forget_process
from pdp.service.server import WORKER_CONFIG_ENV, Service, uvicorn_options
from pdp.service.worker_sockets import CLAIMS_ENV, listening_sockets, restore_workers, use_claiming_workers
from pdp.store import LOCKOUT_TABLE, SHARED_TABLE, SqliteStore


def serve_workers(config: Config, config_path: str | None, host: str, port: int, scheme: str, *, workers: int,
                  log_level: str) -> int:
    """N processes on one HTTP port (uvicorn's workers) and one gRPC port (SO_REUSEPORT), each with its own
    Service: the GIL and regorus engines stay per process. Each has its own caches; metrics are joined.

    What the workers must share, they share: the DPoP nonce secret (drawn here unless configured, handed
    over in the environment, never written anywhere) and, without ``store.url``, the store, so that a
    DPoP proof is accepted once by all of them (RFC 9449 §11.1), and the store secret that authenticates
    the introspection answers they share in it (drawn and handed over the same way unless configured; with
    ``store.url`` only a configured ``store.secret`` shares them): a SQLite file in a private folder made
    here, held open while the server runs (workers open this very file, never a new one) and removed when
    it stops. Workers stop when this process is gone; folders left by one that was killed are removed
    by the next. The workers' metrics are files in a private folder of the same kind (``pdp-metrics-*``)."""
    Service(config).pdp.close()  # fail here, in the parent, on a config or policy that will not load
    remove_stale_state(Path(tempfile.gettempdir()))
    state_dir = None if config.store.url else Path(tempfile.mkdtemp(prefix=STATE_PREFIX))  # mode 0700
    metrics_dir = Path(tempfile.mkdtemp(prefix=METRICS_PREFIX))
    owner = json.dumps({"owner": STATE_MARK, "pid": os.getpid(), "started": _process_started(os.getpid())})
    stores: list[SqliteStore] = []
    try:
        (metrics_dir / STATE_OWNER).write_text(owner)  # prometheus_client reads only *.db files
        store_path, identity, store_secret = "", None, ""
        if state_dir is not None:
            # Only these workers read the file: a secret of their own is enough to share answers in it.
            store_secret = (config.store.secret or os.urandom(MIN_SECRET_BYTES)).hex()
            (state_dir / STATE_OWNER).write_text(owner)
            store_path = str(state_dir / "state.sqlite3")
            stores = [SqliteStore(Path(store_path), table=LOCKOUT_TABLE),
                      SqliteStore(Path(store_path), table=SHARED_TABLE)]  # the schema, before any worker
            identity = stores[0].file_identity()
        os.environ[WORKER_CONFIG_ENV] = json.dumps({
            "config": str(Path(config_path).resolve()) if config_path else "",
            "http": config.server.http, "grpc": config.server.grpc, "log_level": log_level,
            "nonce_secret": config.dpop.nonce_secret.hex(), "store": store_path, "store_identity": identity,
            "store_secret": store_secret, "parent_pid": os.getpid()})
        # Read by prometheus_client when a worker first imports it (workers are started afresh, spawned).
        os.environ[MULTIPROCESS_ENV] = str(metrics_dir)
        server_config = uvicorn.Config("pdp.service.server:worker_app", factory=True, host=host, port=port,
                                       workers=workers, log_level="warning", **uvicorn_options(config))
        # Every listener binds before pdp says it listens: a listening socket for each HTTP worker, each
        # claimed by one (pdp.service.worker_sockets); the gRPC port, which the workers share, is checked.
        if config.server.grpc:
            check_bindable("gRPC", config.server.grpc)
        sockets = listening_sockets(config.server.http, workers, server_config.backlog)
        logging.getLogger("pdp").info("pdp listening on %s://%s:%d with %d workers (engine %s, shared state in %s)",
                                      scheme, host, port, workers, config.policy.engine,
                                      "store.url" if state_dir is None else state_dir)
        os.environ[CLAIMS_ENV] = str(metrics_dir)
        saved = use_claiming_workers()
        try:
            _Supervisor(server_config, sockets, metrics_dir).run()
        finally:
            restore_workers(saved)
            for sock in sockets:
                sock.close()
    finally:
        os.environ.pop(WORKER_CONFIG_ENV, None)
        os.environ.pop(MULTIPROCESS_ENV, None)
        os.environ.pop(CLAIMS_ENV, None)
        for store in stores:
            store.close()
        if state_dir is not None:
            shutil.rmtree(state_dir, ignore_errors=True)
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


class _Supervisor(Multiprocess):
    """uvicorn's supervisor of the workers, which also drops the gauges of each worker that is gone
    (died and replaced, or stopped on SIGHUP/SIGTTOU): a dead worker's last word on the store must not
    count, nor its policy version seem in force. Its counters stay: what it counted happened."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket], metrics_dir: Path) -> None:
        super().__init__(config, sockets)
        self._metrics_dir = metrics_dir
        self._known: set[int] = set()

    def keep_subprocess_alive(self) -> None:
        super().keep_subprocess_alive()
        self._forget_gone()

    def handle_signals(self) -> None:
        super().handle_signals()
        self._forget_gone()

    def _forget_gone(self) -> None:
        alive = {p.pid for p in self.processes if p.pid is not None}
        for pid in self._known - alive:
            forget_process(pid, self._metrics_dir)
        self._known = alive


#: The private state folders of ``pdp serve --workers``, and the file in each that names its owner.
STATE_PREFIX, STATE_OWNER, STATE_MARK = "pdp-workers-", "owner.json", "pdp serve --workers"
#: The private folders of the workers' metrics (marked with the same owner file).
METRICS_PREFIX = "pdp-metrics-"


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
    link) of this user, private, named ``pdp-workers-*`` or ``pdp-metrics-*``, whose owner file names a
    process that is gone."""
    removed = []
    for path in [*folder.glob(STATE_PREFIX + "*"), *folder.glob(METRICS_PREFIX + "*")]:
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
