"""One listening socket per HTTP worker of ``pdp serve --workers N``, on one port (``SO_REUSEPORT``).

With one socket shared by every worker, the worker that wakes first accepts every connection waiting:
a gateway that opens its pool of keep-alive connections at once had them all on one worker (15 of 16,
measured), and a second worker added nothing. With a socket each, bound to the same port with
``SO_REUSEPORT``, the kernel spreads new connections over the sockets by their addresses and ports.

Every socket must be served, or the connections the kernel gives it wait forever: the parent makes N
sockets and keeps them open, every worker gets all of them, and each worker claims one with a lock file
in a private folder (``claim``). The lock dies with its worker, so the worker that replaces one that
died claims its socket. A worker that finds no socket free (a replacement started while the worker it
replaces still runs, as on SIGHUP) serves all of them, so none is ever left unserved.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from pathlib import Path
from typing import IO, Any

from uvicorn.supervisors import multiprocess

log = logging.getLogger("pdp")

#: The folder of the claim files (set by the parent for its workers).
CLAIMS_ENV = "PDP_WORKER_SOCKET_CLAIMS"

#: The claim this process holds, kept open (and so locked) for the life of the process.
_held: list[IO[str]] = []


def listening_sockets(address: str, count: int, backlog: int = 2048) -> list[socket.socket]:
    """``count`` sockets listening on ``address`` (HOST:PORT) with ``SO_REUSEPORT``. The address is first
    bound alone, as without workers, so that one another process holds is a ``ListenError`` here
    (``SO_REUSEPORT`` would otherwise let two servers of one user share it)."""
    from pdp.service.server import bind_http

    probe = bind_http(address)
    family, (host, port) = probe.family, probe.getsockname()[:2]  # port 0: the one the kernel chose
    probe.close()
    sockets = []
    for _ in range(count):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        # Accepted connections inherit this: without it, a worker's answers waited 40 ms each (Nagle
        # against the client's delayed ACK).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.set_inheritable(True)
        sockets.append(sock)
    return sockets


def claim(sockets: list[socket.socket], folder: Path) -> list[socket.socket]:
    """The sockets this worker serves: the first one no other live worker has claimed, or all of them
    when every one is claimed (they all stay served)."""
    for index, sock in enumerate(sockets):
        try:
            handle = (folder / f"http-{index}.claim").open("a")
        except OSError as exc:  # the folder is gone (a temp-folder cleaner): serve them all, never none
            log.error("worker %d cannot claim an HTTP socket (%s): it serves all of them", os.getpid(), exc)
            return sockets
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        _held.append(handle)
        return [sock]
    log.info("worker %d found every HTTP socket claimed: it serves all of them", os.getpid())
    return sockets


class ClaimingProcess(multiprocess.Process):
    """uvicorn's worker process, serving the socket it claims rather than every socket it is given."""

    def target(self, sockets: list[socket.socket] | None = None) -> None:  # pragma: no cover - in the worker
        folder = os.environ.get(CLAIMS_ENV)
        if sockets and folder:
            sockets = claim(sockets, Path(folder))
        super().target(sockets)


def use_claiming_workers() -> Any:
    """Make uvicorn's supervisor start ``ClaimingProcess`` workers (it names its process class at module
    level); returns what to restore."""
    saved = multiprocess.Process
    multiprocess.Process = ClaimingProcess  # type: ignore[misc]
    return saved


def restore_workers(saved: Any) -> None:
    multiprocess.Process = saved  # type: ignore[misc]
