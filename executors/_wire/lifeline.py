"""Worker processes never outlive their parent, nor do the processes they started.

A worker calls :func:`arm` first thing. From then on, when its parent dies (even by ``SIGKILL``)
the worker kills every process it started and exits, within about a second:

* where Linux has it, ``prctl(PR_SET_PDEATHSIG, SIGTERM)``: the kernel sends the worker
  ``SIGTERM`` as its parent dies, and the handler :func:`arm` installs kills the worker's
  descendants and exits; (the signal is tied to the parent's *thread* that started the worker:
  a backend passes ``pdeathsig=True`` only when that thread lives as long as the executor);
* everywhere, a daemon thread blocked reading the worker's end of the parent's *anchor*
  (:func:`anchor`: a socketpair the parent makes once and holds for its whole life, and never
  writes to): the kernel closes the parent's end as the parent dies, however it dies, and the
  read returns end of file; the thread then does the same. The worker gets its end as the
  backends pass their sockets; a process forked from the parent closes its copy of the
  parent's end at once (``os.register_at_fork``), or it would keep it open. (A process that
  the parent forks *before* that hook, or that inherits the end by other means, would keep the
  workers alive past the parent where no parent-death signal exists.) Where no anchor was
  passed (Dask's workers), the thread looks at ``os.getppid()`` every ``_WATCH_S`` seconds
  instead (a dead parent's children are handed to another process);
* on Linux the worker is also a *child subreaper* (``PR_SET_CHILD_SUBREAPER``): a process a
  state daemonized (double fork, ``setsid``) stays its descendant, so :func:`kill_tree` of the
  worker, here or from the parent at stop, finds it too. (A subreaper's exited orphans stay
  zombies until the worker exits.)

:func:`sweep` removes the temporary directories of executors whose parent died before it could
(named ``<prefix><pid>-...`` by :func:`make_temp_dir`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["anchor", "arm", "kill_descendants", "kill_tree", "make_temp_dir", "sweep"]

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_WATCH_S = 0.2  # how often the watch thread looks at the parent
_EXIT_CODE = 70  # what a worker whose parent died exits with


def _prctl(option: int, value: int) -> bool:
    """``prctl(option, value)`` where Linux has it; False elsewhere or on failure."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(option, value, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


_anchor: tuple[socket.socket, socket.socket] | None = None  # (ours, the workers' end)
_anchor_lock = threading.Lock()
_held: socket.socket | None = None  # a worker's end of its parent's anchor


def anchor() -> socket.socket:
    """In a parent: the workers' end of this process's anchor, to pass to a worker for
    :func:`arm` (made on first use; both ends stay open as long as this process lives)."""
    global _anchor
    with _anchor_lock:
        if _anchor is None or _anchor[0].fileno() < 0:
            _anchor = socket.socketpair()  # not inheritable: an exec'd child gets it passed
            if hasattr(os, "register_at_fork"):
                os.register_at_fork(after_in_child=_forget_anchor)
        return _anchor[1]


def _forget_anchor() -> None:
    """In a process forked from the parent: its copy of the parent's end would keep the
    workers' end from ever seeing end of file; close it (the workers' end stays: a forked
    worker watches it)."""
    global _anchor
    if _anchor is not None:
        with contextlib.suppress(OSError):
            _anchor[0].close()
        _anchor = None


def arm(parent: int, *, pdeathsig: bool = True, watch: socket.socket | None = None) -> None:
    """In a worker (its main thread), at start: die with ``parent``, with what it started.
    ``watch``: the parent's :func:`anchor` (without it, ``getppid()`` is polled)."""
    global _held
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    if pdeathsig and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before we could watch it
        _die()
    if watch is not None:
        _held = watch  # kept open for the worker's life
        target: Callable[..., None] = _watch_end
        args: tuple[Any, ...] = (watch, parent)
    else:
        target, args = _watch, (parent,)
    threading.Thread(target=target, args=args, name="statepool-lifeline", daemon=True).start()


def _watch_end(end: socket.socket, parent: int) -> None:
    """Wait for end of file on the anchor: the parent is gone."""
    try:
        end.setblocking(True)
        while end.recv(1):  # nobody writes: only end of file comes
            pass
    except OSError:  # closed under us (a state closed every descriptor?): watch the PID
        _watch(parent)
        return
    _die()


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(_WATCH_S)
    _die()


def _on_sigterm(signum: int, frame: object) -> None:
    _die()


def _die() -> None:
    """Kill what this process started, then exit at once (no clean-up: the parent is gone)."""
    with contextlib.suppress(BaseException):
        kill_descendants()
    os._exit(_EXIT_CODE)


def kill_descendants() -> None:
    """SIGKILL every descendant of this process (not this process)."""
    _kill(os.getpid(), itself=False)


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and its descendants (a state may have started processes of its own)."""
    _kill(pid, itself=True)


def _kill(pid: int, *, itself: bool) -> None:
    import psutil

    try:
        proc = psutil.Process(pid)
        victims = [*proc.children(recursive=True), *([proc] if itself else [])]
    except psutil.Error:
        return
    for victim in victims:
        with contextlib.suppress(psutil.Error):
            victim.kill()


def make_temp_dir(prefix: str) -> str:
    """A private temporary directory ``<prefix><our pid>-...``, after removing those of dead
    parents (:func:`sweep`)."""
    import tempfile

    sweep(prefix)
    return tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-")


def sweep(prefix: str, root: str | None = None) -> list[str]:
    """Remove the directories ``<prefix><pid>-...`` of ``root`` (the temporary directory) that
    belong to this user and whose process is gone; answer their paths."""
    import shutil
    import tempfile

    root = tempfile.gettempdir() if root is None else root
    removed: list[str] = []
    try:
        names = os.listdir(root)
    except OSError:
        return removed
    uid = os.getuid() if hasattr(os, "getuid") else None
    for name in names:
        if not name.startswith(prefix):
            continue
        pid_text = name[len(prefix):].split("-", 1)[0]
        if not pid_text.isdigit():
            continue
        path = os.path.join(root, name)
        try:
            info = os.lstat(path)
        except OSError:
            continue
        if uid is not None and info.st_uid != uid:
            continue
        if _alive_since(int(pid_text), info.st_mtime):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _alive_since(pid: int, mtime: float) -> bool:
    """Is ``pid`` a live process that may own a directory last changed at ``mtime``? (A PID
    reused by a process started later is not its owner.)"""
    import psutil

    try:
        started = float(psutil.Process(pid).create_time())
    except psutil.Error:  # gone
        return False
    return started <= mtime + 1.0
