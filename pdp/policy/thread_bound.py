"""Objects that may be freed only on the thread that made them, and each thread's cache of them.

regorus's ``Engine`` is a pyo3 *unsendable* class: freed on any other thread, pyo3 refuses, leaks it and
prints "Exception ignored … regoruspy::Engine is unsendable, but is being dropped on another thread" with
a traceback. Each thread keeps its engines in its own cache (``thread_cache``), freed on that thread when
it ends; but a reference held elsewhere can outlive the cache's: a traceback frame kept by a log record,
an exception handed from a worker thread to the event loop, a reference cycle that the garbage collector
frees on whatever thread it happens to run.

``ThreadBound`` holds such an object. When the holder is freed on another thread, the object is handed
back to its own thread, which frees it the next time it asks for its cache, or when it ends. When its
thread has already ended, nothing may ever free it: it is kept, and counted (``kept_count``), rather than
a traceback on the console.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class _Thread:
    """One thread, as the holders of its objects know it: its ident while it runs, the objects handed back."""

    __slots__ = ("ident", "orphans")

    def __init__(self) -> None:
        self.ident: int | None = threading.get_ident()
        self.orphans: list[object] = []


class _Slot:
    """One thread's local storage: its caches. Nothing else refers to it, so it is freed on the thread
    itself when the thread ends (Python frees a thread's local storage there)."""

    __slots__ = ("caches", "thread")

    def __init__(self) -> None:
        self.thread = _Thread()
        self.caches: dict[str, dict[Any, Any]] = {}

    def __del__(self) -> None:
        if threading.get_ident() != self.thread.ident:
            # Another thread frees this one's storage: at exit, the interpreter clears the threads still
            # running (daemon threads) from the main thread. Nothing of it may be freed there: keep it all.
            with _LOCK:
                self.thread.ident = None
                _KEPT.extend((self.caches, self.thread.orphans))
            return
        # Free what is ours while this thread still counts as its owner, then let later comers know it
        # has gone.
        self.caches.clear()
        with _LOCK:
            self.thread.ident = None
            orphans, self.thread.orphans = self.thread.orphans, []
        del orphans


_LOCAL = threading.local()
#: Re-entrant: the garbage collector may free a holder on a thread that is inside one of these blocks.
_LOCK = threading.RLock()
#: Objects whose thread ended before they could be freed there. The list holds one reference nothing
#: gives back, so that not even the interpreter's teardown at exit frees it (on the main thread).
_KEPT: list[object] = []
ctypes.pythonapi.Py_IncRef(ctypes.py_object(_KEPT))


def _slot() -> _Slot:
    slot: _Slot | None = getattr(_LOCAL, "slot", None)
    if slot is None:
        slot = _LOCAL.slot = _Slot()
    return slot


def thread_cache(name: str) -> dict[Any, Any]:
    """This thread's cache ``name`` (freed on this thread when it ends); frees first what other threads
    handed back to this one."""
    slot = _slot()
    if slot.thread.orphans:
        with _LOCK:
            orphans, slot.thread.orphans = slot.thread.orphans, []
        del orphans
    cache = slot.caches.get(name)
    if cache is None:
        cache = slot.caches[name] = {}
    return cache


class ThreadBound(Generic[T]):
    """Holds ``value``, which is freed on the thread that made this holder wherever the holder is freed."""

    __slots__ = ("_thread", "value")

    def __init__(self, value: T) -> None:
        self.value = value
        self._thread = _slot().thread

    def __del__(self) -> None:
        thread = self._thread
        if thread.ident == threading.get_ident():
            return  # on its own thread: the value is freed with this holder
        with _LOCK:
            (_KEPT if thread.ident is None else thread.orphans).append(self.value)


def kept_count() -> int:
    """How many objects outlived their thread and are kept, never freed."""
    return len(_KEPT)
