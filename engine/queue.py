"""The manager's queue: FIFO for priority 0, a heap for the others, O(log n) put and pop.

Every state of the default priority 0 goes into a ``deque`` (as before priorities existed: the
common path pays nothing for them); a state of another priority goes into a heap keyed by
``(-priority, sequence)``, so that higher priorities come first and equal ones keep their order.
The main loop takes from the heap while its top has a priority above 0, then from the deque, then
from the heap (priorities below 0). A state that waited without holding the queue (dependencies,
a tag slot, a retry delay) comes back into the heap with a negative sequence number: ahead of the
states queued at its priority (the deque too, for priority 0), FIFO among those that came back.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .handle import StateHandle

__all__ = ["StateQueue"]

_FRONT = -(1 << 62)  # sequence numbers of states coming back: ahead of every queued one
_ZERO = (0, 0)  # heap entries below it go before the FIFO (priority 0), the others after it


class StateQueue:
    """Queued handles in priority order, FIFO among equal priorities."""

    __slots__ = ("_front", "_seq", "fifo", "heap")

    def __init__(self) -> None:
        self.fifo: deque[StateHandle] = deque()  # priority 0
        self.heap: list[tuple[int, int, StateHandle]] = []  # (-priority, sequence, handle)
        self._seq = itertools.count()
        self._front = itertools.count(_FRONT)

    def __len__(self) -> int:
        return len(self.fifo) + len(self.heap)

    def __bool__(self) -> bool:
        return bool(self.fifo or self.heap)

    def __iter__(self) -> Iterator[StateHandle]:
        """The queued handles: the heap's above priority 0, the FIFO, then the others
        (in heap order within each part, not sorted)."""
        heap = self.heap
        yield from (e[2] for e in heap if e < _ZERO)
        yield from self.fifo
        yield from (e[2] for e in heap if e > _ZERO)

    def __getitem__(self, index: int) -> StateHandle:
        """``queue[0]``: the handle ``pop()`` returns next (only index 0)."""
        if index != 0:
            raise IndexError("StateQueue supports only [0], the next handle")
        heap = self.heap
        if heap and (heap[0] < _ZERO or not self.fifo):
            return heap[0][2]
        return self.fifo[0]

    def push(self, handle: StateHandle) -> None:
        """Queue ``handle`` behind every queued state of its priority or a higher one."""
        priority = handle.state.priority
        if priority:
            heapq.heappush(self.heap, (-priority, next(self._seq), handle))
        else:
            self.fifo.append(handle)

    def extend(self, handles: Iterable[StateHandle]) -> None:
        for handle in handles:
            self.push(handle)

    def push_front(self, handle: StateHandle) -> None:
        """``handle`` comes back from waiting: ahead of the queued states of its priority, behind
        those that came back before it (in the heap, whatever its priority)."""
        heapq.heappush(self.heap, (-handle.state.priority, next(self._front), handle))

    def pop(self) -> StateHandle:
        """The next handle (``IndexError`` when empty)."""
        heap = self.heap
        if heap and (heap[0] < _ZERO or not self.fifo):
            return heapq.heappop(heap)[2]
        return self.fifo.popleft()
