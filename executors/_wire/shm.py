"""Pickling for the ``"process"`` and ``"aioprocess"`` executors, large buffers out of band,
both ways.

A batch of calls is cloudpickled in one go (the function and what the calls share are pickled
once). Any buffer of at least ``OOB_MIN`` bytes that offers pickle protocol 5 out-of-band
transfer (a numpy array, a ``bytearray``, a ``PickleBuffer``), and any ``bytes`` argument that
large, is left out of the stream and written into a file of the executor's private temporary
directory instead. The other side maps that file copy-on-write and unpickles over the mapping
(:func:`map_buffers`): an array arrives without a copy, and may be written to without touching
the sender's. Results come back the same way: a worker writes the large buffers of a result into
a file of the same directory. The parent removes an arguments' file when their batch is over and
a result's file as soon as it has mapped it; the directory goes with the executor. Nothing lands
in ``/dev/shm``, and the parent never copies a large buffer while it holds the GIL: the kernel
does, in ``pwrite``. (A large ``bytes`` *result* is the exception: building it is a copy.)
"""

from __future__ import annotations

import contextlib
import io
import mmap
import os
import pickle
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from ..base import PreparedCall
from .remote import INLINE_DUMPS_LIMIT, Pickler, dumps_call, dumps_error, loads_outcome

__all__ = ["OOB_MIN", "Packed", "dumps_call_out", "keep_out", "load_outcome", "map_buffers",
           "meta_path", "pack", "release", "write_buffers", "write_out"]

OOB_MIN = 1 << 20  # a buffer this large leaves the pickle stream
_ALIGN = 64


class _TooBig(Exception):
    pass


class _Capped:
    """A write-only file that gives up past ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        self.parts: list[bytes] = []
        self.left = limit

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.left -= view.nbytes
        if self.left < 0:
            raise _TooBig
        self.parts.append(view.tobytes())
        return view.nbytes


def _bytes_from(buffer: Any) -> bytes:
    """Rebuild a ``bytes`` object that travelled out of band (a copy, on the receiving side)."""
    return bytes(buffer)


class _OutOfBand:
    """A large ``bytes`` argument, pickled as a protocol 5 buffer (so it may stay out of band;
    the C pickler never asks about ``bytes``), rebuilt as ``bytes`` on the other side."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return _bytes_from, (pickle.PickleBuffer(self.data),)


def _large(value: Any) -> bool:
    return type(value) is bytes and len(value) >= OOB_MIN


def _item(call: PreparedCall) -> tuple[Any, ...]:
    """What travels of ``call``, its large ``bytes`` arguments wrapped to go out of band."""
    args, kwargs = call.args, call.kwargs
    for a in args:
        if type(a) is bytes and len(a) >= OOB_MIN:
            args = tuple(_OutOfBand(a) if _large(a) else a for a in args)
            break
    if kwargs:
        for v in kwargs.values():
            if type(v) is bytes and len(v) >= OOB_MIN:
                kwargs = {k: _OutOfBand(v) if _large(v) else v for k, v in kwargs.items()}
                break
    return call.state_name, call.fn, args, kwargs


def keep_out(buffers: list[pickle.PickleBuffer]) -> Callable[[pickle.PickleBuffer], bool]:
    """A ``buffer_callback`` that keeps buffers of ``OOB_MIN`` bytes or more out of band, in
    ``buffers``."""

    def callback(buffer: pickle.PickleBuffer) -> bool:
        if memoryview(buffer).nbytes >= OOB_MIN:
            buffers.append(buffer)
            return False  # out of band
        return True

    return callback


class Packed:
    """A pickled batch: ``body``, and its out-of-band ``buffers`` until they are written out
    (then ``meta`` names their file, ``path``)."""

    __slots__ = ("body", "buffers", "failed", "meta", "path")

    def __init__(self, body: bytes, buffers: list[pickle.PickleBuffer]) -> None:
        self.body = body
        self.buffers = buffers
        self.failed: dict[int, BaseException] = {}  # index in the batch -> SerializationError
        self.meta = b""
        self.path: str | None = None


def pack(calls: Sequence[PreparedCall], *, inline: bool) -> Packed | None:
    """Pickle ``calls`` as one list. ``inline=True`` (on the event loop thread) gives up and
    answers ``None`` past ``INLINE_DUMPS_LIMIT`` bytes of stream (out-of-band buffers do not
    count: they are not copied). A call that does not pickle is left out: ``None`` takes its
    place in the list, and ``Packed.failed`` holds the SerializationError that names its part."""
    items: list[Any] = [_item(c) if c.args or c.kwargs else (c.state_name, c.fn, (), c.kwargs)
                        for c in calls]
    try:
        return _pack(items, inline)
    except _TooBig:
        return None
    except BaseException as exc:  # find the calls at fault (a __reduce__ may even sys.exit())
        error = exc
    failed: dict[int, BaseException] = {}
    for i, call in enumerate(calls):
        try:
            dumps_call(call)
        except Exception as exc:  # a SerializationError naming the state and the part
            failed[i] = exc
            items[i] = None
    if not failed:  # each pickles alone but not with the others: the caller sends them apart
        raise error
    try:
        packed = _pack(items, inline)
    except _TooBig:
        return None
    packed.failed = failed
    return packed


def _pack(items: list[Any], inline: bool) -> Packed:
    buffers: list[pickle.PickleBuffer] = []
    sink: Any = _Capped(INLINE_DUMPS_LIMIT) if inline else io.BytesIO()
    Pickler(sink, protocol=5, buffer_callback=keep_out(buffers)).dump(items)
    body = b"".join(sink.parts) if inline else sink.getvalue()
    return Packed(body, buffers)


def dumps_call_out(call: PreparedCall, directory: str) -> tuple[bytes, bytes]:
    """One call as :func:`remote.dumps_call` pickles it, its large buffers (arrays,
    ``bytearray``, ``bytes``) written into a file of ``directory``: ``(meta, payload)``, ``meta``
    empty when there were none. Blocking: never on the event loop thread."""
    buffers: list[pickle.PickleBuffer] = []
    _, fn, args, kwargs = _item(call)
    payload = dumps_call(call, (fn, args, kwargs), keep_out(buffers))
    return (write_buffers(buffers, directory) if buffers else b""), payload


def write_out(buffers: list[pickle.PickleBuffer], directory: str, name: str,
              outcome: bytes) -> tuple[bytes, bytes]:
    """In a worker: write a result's large buffers into a file of ``directory``:
    ``(meta, outcome)``; a failure to write (no room left, say) fails the call with that."""
    try:
        meta = write_buffers(buffers, directory)
    except BaseException as exc:
        return b"", dumps_error(name, exc)
    finally:
        buffers.clear()
    return meta, outcome


def load_outcome(body: bytes | bytearray | memoryview, meta_len: int, state_name: str) -> Any:
    """The result (or raise the exception) of an outcome whose first ``meta_len`` bytes name
    its file of out-of-band buffers (none when 0); that file is removed once mapped."""
    if not meta_len:
        return loads_outcome(body, None, state_name)
    meta = body[:meta_len]
    try:
        buffers = map_buffers(meta)
    finally:
        release(meta_path(meta))
    return loads_outcome(memoryview(body)[meta_len:], buffers, state_name)


def write_buffers(buffers: Sequence[pickle.PickleBuffer], directory: str) -> bytes:
    """Write ``buffers`` into a new file of ``directory``; answer the ``meta`` that
    :func:`map_buffers` reads them back with. Blocking: never on the event loop thread."""
    fd, path = tempfile.mkstemp(prefix="oob-", dir=directory)
    spans = []
    offset = 0
    try:
        for buffer in buffers:
            raw = buffer.raw()
            offset += -offset % _ALIGN
            spans.append((offset, raw.nbytes))
            written = 0
            while written < raw.nbytes:  # the kernel copies, without the GIL
                written += os.pwrite(fd, raw[written:], offset + written)
            offset += raw.nbytes
    except BaseException:
        release(path)
        raise
    finally:
        os.close(fd)
    return pickle.dumps((path, spans))


def meta_path(meta: bytes | bytearray | memoryview) -> str:
    """The file that ``meta`` names."""
    path: str = pickle.loads(meta)[0]
    return path


def map_buffers(meta: bytes | bytearray | memoryview) -> list[memoryview]:
    """The buffers ``meta`` names, as views of their file mapped copy-on-write (the views keep
    the mapping alive, no longer)."""
    path, spans = pickle.loads(meta)
    with open(path, "rb") as file:
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    view = memoryview(mapped)
    return [view[start:start + size] for start, size in spans]


def release(path: str | None) -> None:
    """Remove a file of out-of-band buffers (a process that mapped it keeps its mapping)."""
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
