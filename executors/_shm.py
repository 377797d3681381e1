"""Pickling a batch of calls for the ``"process"`` executor, large buffers out of band.

A batch is cloudpickled in one go (the function and what the calls share are pickled once). Any
buffer of at least ``OOB_MIN`` bytes that offers pickle protocol 5 out-of-band transfer (a numpy
array, a ``bytearray``, a ``PickleBuffer``) is left out of the stream and written into a file of
the executor's private temporary directory instead. The worker maps that file copy-on-write and
unpickles the calls over the mapping (``_loky_worker.load_batch``): it reads the array without a
copy, and may write to it without touching the parent's. The parent removes the file when the
batch is over; the directory goes with the executor. Nothing lands in ``/dev/shm``.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
from collections.abc import Sequence
from typing import Any

import cloudpickle

from ._remote import INLINE_DUMPS_LIMIT, dumps_call
from .base import PreparedCall

__all__ = ["OOB_MIN", "Packed", "pack", "release", "write_buffers"]

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


class Packed:
    """A pickled batch: ``body`` and the out-of-band ``buffers`` still to write to a file."""

    __slots__ = ("body", "buffers", "failed", "meta", "path")

    def __init__(self, body: bytes, buffers: list[pickle.PickleBuffer],
                 failed: dict[int, BaseException]) -> None:
        self.body = body
        self.buffers = buffers
        self.failed = failed  # index in the batch -> its SerializationError (left out)
        self.meta = b""
        self.path: str | None = None


def pack(calls: Sequence[PreparedCall], *, inline: bool) -> Packed | None:
    """Pickle ``calls`` as one list. ``inline=True`` (on the event loop thread) gives up and
    answers ``None`` past ``INLINE_DUMPS_LIMIT`` bytes of stream. A call that does not pickle
    is left out: ``None`` takes its place in the list, and ``Packed.failed`` holds the
    SerializationError that names its part."""
    items: list[Any] = [(c.state_name, c.fn, c.args, c.kwargs) for c in calls]
    try:
        return _pack(items, inline)
    except _TooBig:
        return None
    except Exception as exc:  # find the calls at fault, pack the others
        error = exc
    failed: dict[int, BaseException] = {}
    for i, call in enumerate(calls):
        try:
            dumps_call(call)
        except Exception as exc:
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

    def keep_out(buffer: pickle.PickleBuffer) -> bool:
        if memoryview(buffer).nbytes >= OOB_MIN:
            buffers.append(buffer)
            return False  # out of band
        return True

    if inline:
        sink = _Capped(INLINE_DUMPS_LIMIT)
        cloudpickle.Pickler(sink, protocol=5, buffer_callback=keep_out).dump(items)
        return Packed(b"".join(sink.parts), buffers, {})
    data: bytes = cloudpickle.dumps(items, protocol=5, buffer_callback=keep_out)
    return Packed(data, buffers, {})


def write_buffers(packed: Packed, directory: str) -> None:
    """Write ``packed``'s out-of-band buffers into a new file of ``directory`` (blocking: not on
    the event loop thread); sets ``packed.path`` and ``packed.meta``."""
    if not packed.buffers:
        return
    fd, path = tempfile.mkstemp(prefix="oob-", dir=directory)
    packed.path = path
    spans = []
    offset = 0
    try:
        for buffer in packed.buffers:
            raw = buffer.raw()
            offset += -offset % _ALIGN
            spans.append((offset, raw.nbytes))
            written = 0
            while written < raw.nbytes:
                written += os.pwrite(fd, raw[written:], offset + written)
            offset += raw.nbytes
    finally:
        os.close(fd)
    packed.buffers = []
    packed.meta = pickle.dumps((path, spans))


def release(path: str | None) -> None:
    """Remove a file of out-of-band buffers (a worker that mapped it keeps its mapping)."""
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
