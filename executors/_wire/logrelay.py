"""Worker logs in the parent: what a state logs in a ``"process"`` or ``"aioprocess"`` worker
reaches the parent's ``logging`` under its own logger name and level, with ``state`` and
``worker`` (the PID) among the record's attributes.

The parent's :class:`Relay` owns a datagram socket (a Unix socket, in the abstract namespace
on Linux) read on its event loop. A worker gets :meth:`Relay.config` as it starts: the socket's
address and the levels the parent's loggers have then; :func:`install` sets the same levels in
the worker and puts a handler on its root logger that sends each record as one datagram, at
once, from the thread that logs it. A datagram the worker sent is in the parent's socket even
if the worker dies right after, so nothing it logged before dying is lost
(:meth:`Relay.drain` reads it before the death is handled).
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import os
import pickle
import socket
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio

__all__ = ["STATE", "Relay", "install"]

logger = logging.getLogger(__name__)

#: the state a worker runs now (set around each call by _wire/remote.py)
STATE: contextvars.ContextVar[str | None] = contextvars.ContextVar("statepool_state",
                                                                   default=None)
_MAX = 60_000  # bytes in one datagram: a longer message or traceback is cut
_ids = itertools.count()


class Relay:
    """The parent's end: one socket for the workers of one executor."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._dir: str | None = None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            if sys.platform.startswith("linux"):
                self.address: str = (f"\0statepool-log-{os.getpid()}-{next(_ids)}-"
                                     f"{os.urandom(4).hex()}")
            else:  # pragma: no cover - no abstract namespace: a path in a private directory
                import tempfile

                self._dir = tempfile.mkdtemp(prefix="statepool-log-")
                self.address = os.path.join(self._dir, "relay")
            sock.bind(self.address)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock: socket.socket | None = sock
        loop.add_reader(sock.fileno(), self.drain)

    def config(self) -> dict[str, Any]:
        """What a worker starting now needs: the address and the parent's levels."""
        manager = logging.Logger.manager
        levels = {name: lg.level for name, lg in list(manager.loggerDict.items())
                  if isinstance(lg, logging.Logger) and lg.level != logging.NOTSET}
        return {"address": self.address, "root": logging.getLogger().level,
                "levels": levels, "disable": manager.disable}

    def drain(self) -> None:
        """Hand every record waiting in the socket to the parent's loggers."""
        sock = self._sock
        while sock is not None:
            try:
                data = sock.recv(1 << 20)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            try:
                deliver(data)
            except Exception:  # a record that does not load: say so, go on
                logger.warning("a worker's log record could not be read", exc_info=True)

    def close(self) -> None:
        """Read what is left, then close (the executor shut down)."""
        sock = self._sock
        if sock is None:
            return
        self.drain()
        self._sock = None
        self._loop.remove_reader(sock.fileno())
        sock.close()
        if self._dir is not None:  # pragma: no cover - not Linux
            import shutil

            shutil.rmtree(self._dir, ignore_errors=True)


def deliver(data: bytes) -> None:
    """One record from a worker, to the logger of its name in this process."""
    fields = pickle.loads(data)
    record = logging.makeLogRecord(fields)
    name = record.name
    target = logging.getLogger() if name == "root" else logging.getLogger(name)
    if target.isEnabledFor(record.levelno):
        target.handle(record)


# -- worker side ----------------------------------------------------------------------------


class _Handler(logging.Handler):
    """Sends each record to the parent as one datagram (from the thread that logs it)."""

    def __init__(self, address: str) -> None:
        super().__init__(logging.NOTSET)
        self.pid = os.getpid()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.connect(address)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = self._pack(record)
        except Exception:
            return
        try:
            self.sock.send(data)
        except OSError:  # the parent is gone, or the record is too long even cut
            return

    def _pack(self, record: logging.LogRecord) -> bytes:
        fields = dict(record.__dict__)
        fields["msg"] = _cut(record.getMessage())
        fields["args"] = None
        if record.exc_info:
            import traceback

            fields["exc_text"] = record.exc_text or "".join(
                traceback.format_exception(*record.exc_info))
        if fields.get("exc_text"):
            fields["exc_text"] = _cut(fields["exc_text"])
        fields["exc_info"] = None
        fields.setdefault("state", STATE.get())
        fields["worker"] = self.pid
        try:
            return pickle.dumps(fields, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # an extra that does not pickle: carried as its repr
            return pickle.dumps({k: v if isinstance(v, (str, int, float, type(None)))
                                 else repr(v) for k, v in fields.items()})


def _cut(text: str) -> str:
    return text if len(text) <= _MAX // 2 else text[: _MAX // 2] + " [... cut]"


def install(config: dict[str, Any] | None) -> None:
    """In a worker as it starts: the parent's levels, and the handler that relays records."""
    if not config:
        return
    root = logging.getLogger()
    root.setLevel(config["root"])
    for name, level in config["levels"].items():
        logging.getLogger(name).setLevel(level)
    if config["disable"]:
        logging.disable(config["disable"])
    for handler in list(root.handlers):
        if isinstance(handler, _Handler):
            root.removeHandler(handler)
    try:
        handler = _Handler(config["address"])
    except OSError:  # the parent's socket is gone already: log here as before
        return
    root.addHandler(handler)
