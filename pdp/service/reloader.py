"""Re-read policy, trust bundles and JWKS files when they change; keep the last good version otherwise.

``wake()`` (``pdp serve`` calls it on ``SIGHUP``) reloads every part at once,
changed or not, whether polling is on or off.

Files are polled (mtime, size) every ``interval`` seconds: no extra
dependency, and it works the same on every file system and in containers
where inotify events do not cross mounts. Each part is reloaded on its own:
a broken trust bundle does not hold back a policy fix.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pdp.errors import ConfigError

log = logging.getLogger("pdp.reload")

Stamp = tuple[tuple[str, float, int], ...]


def stamp(files: list[Path]) -> Stamp:
    out: list[tuple[str, float, int]] = []
    for f in files:
        try:
            st = f.stat()
            out.append((str(f), st.st_mtime, st.st_size))
        except OSError:
            out.append((str(f), -1.0, -1))
    return tuple(out)


@dataclass
class Watched:
    """One reloadable part: how to list its files, and how to load and apply a new version."""

    name: str
    files: Callable[[], list[Path]]
    reload: Callable[[], None]
    last: Stamp = field(default=())
    failed_stamp: Stamp | None = None


class Reloader:
    def __init__(self, parts: list[Watched], interval: float,
                 on_result: Callable[[str, bool, str], None] | None = None) -> None:
        self.parts = parts
        self.interval = interval
        self.on_result = on_result
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        for part in parts:
            part.last = stamp(part.files())

    def check(self, *, force: bool = False) -> None:
        """Reload every part whose files changed since the last look (one pass; the thread loops on it);
        with ``force``, every part, changed or not (a file rewritten within the file system's timestamp
        resolution, to the same size, looks unchanged)."""
        for part in self.parts:
            current = stamp(part.files())
            if not force and (current == part.last or current == part.failed_stamp):
                continue
            try:
                part.reload()
            except ConfigError as exc:
                part.failed_stamp = current
                log.error("reload of %s refused, keeping the version in force: %s", part.name, exc)
                if self.on_result:
                    self.on_result(part.name, False, str(exc))
                continue
            except Exception as exc:
                part.failed_stamp = current
                log.exception("reload of %s failed, keeping the version in force", part.name)
                if self.on_result:
                    self.on_result(part.name, False, repr(exc))
                continue
            part.last = current
            part.failed_stamp = None
            log.info("reloaded %s", part.name)
            if self.on_result:
                self.on_result(part.name, True, "")

    def wake(self) -> None:
        """Have the thread reload every part now (``SIGHUP``), even with polling off. Only sets an event:
        safe in a signal handler, and the event loop that received the signal does no reload work."""
        self._wake.set()

    def start(self) -> None:
        if self._thread is not None:
            return

        def loop() -> None:
            while not self._stop.is_set():
                woken = self._wake.wait(self.interval if self.interval > 0 else None)
                if self._stop.is_set():
                    return
                if woken:
                    self._wake.clear()
                    log.info("reloading every part on request")
                self.check(force=woken)

        self._thread = threading.Thread(target=loop, name="pdp-reloader", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
