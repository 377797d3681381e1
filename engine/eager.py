"""Eager start for coroutine states: run the first step at once, make a task only if it waits.

A trivial coroutine state (one that returns without ever waiting) costs an ``asyncio.Task``
otherwise: its creation, a loop turn to start it, its registration among all tasks. Python 3.12
added eager tasks (``eager_start=True``); this module gives the manager the same on every
supported Python, with ``asyncio.current_task()`` right throughout:

* the state's first step runs at once, in the state's context, while the current task of the loop
  is an :class:`EagerTask`: an ``asyncio.Task`` not yet bound to a coroutine. ``cancel()``,
  ``cancelling()``, ``uncancel()``, ``add_done_callback()``, names and the rest work on it as on
  any pending task, so ``asyncio.timeout()`` and ``asyncio.TaskGroup()`` entered in the first step
  hold the right task;
* a step that ends (a result, an exception) ends the state there: no task is ever scheduled;
* a step that waits hands the coroutine to that same object, now initialised as a real
  ``asyncio.Task`` (:meth:`EagerTask.bind`): what was asked of it meanwhile (cancellation, done
  callbacks, a name) carries over, and the coroutine goes on from the await where it stopped.

Used only where the loop runs asyncio's own C tasks and has no custom task factory
(:func:`usable`); the manager takes the ordinary path otherwise.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import sys
import types
from collections.abc import Callable, Coroutine, Generator
from types import CoroutineType
from typing import Any

__all__ = ["DONE", "ENABLED", "EagerTask", "Resume", "first_step", "prime", "usable"]

_tasks = asyncio.tasks
try:  # the C implementation: the trick below relies on its Task being subclassable uninitialised
    import _asyncio

    _C_TASK: type | None = _asyncio.Task
except (ImportError, AttributeError):  # pragma: no cover - a Python without the C accelerator
    _C_TASK = None
# How the loop's current task is swapped: 3.12+ has the function asyncio's eager tasks use; 3.11
# keeps the current tasks in a dict by loop.
_swap: Callable[[asyncio.AbstractEventLoop, Any], Any] | None = getattr(
    _tasks, "_swap_current_task", None)
_current: dict[asyncio.AbstractEventLoop, Any] | None = getattr(_tasks, "_current_tasks", None)
#: True where eager start is used: asyncio's C tasks on the CPython versions it is tested on
#: (3.11: Task(context=...) and uncancel() are 3.11's; up to 3.13: the C Task's internals it
#: relies on are checked by tests/test_eager.py there). Elsewhere states take the ordinary path.
ENABLED = ((3, 11) <= sys.version_info < (3, 14)
           and _C_TASK is not None and asyncio.Task is _C_TASK
           and (_swap is not None or isinstance(_current, dict)))
_names = itertools.count(1)


def usable(loop: asyncio.AbstractEventLoop) -> bool:
    """True when states on ``loop`` may start eagerly (asyncio's C tasks, no task factory)."""
    return ENABLED and loop.get_task_factory() is None


class _Asked:
    """What was asked of an unbound :class:`EagerTask` (made on the first request)."""

    __slots__ = ("callbacks", "cancels", "message", "must_cancel", "name")

    def __init__(self) -> None:
        self.name: str | None = None
        self.cancels = 0
        self.must_cancel = False
        self.message: Any = None
        self.callbacks: list[tuple[Callable[[Any], object], contextvars.Context | None]] = []


class EagerTask(asyncio.Task):  # type: ignore[type-arg]
    """A task whose coroutine runs its first step before the task exists as far as asyncio knows.

    Built with :meth:`new` (no coroutine, nothing scheduled); :meth:`bind` makes it an ordinary
    ``asyncio.Task`` when the first step waits. Until then the methods below answer for it.
    """

    __slots__ = ("_asked", "_coro0", "_loop0", "first_result", "steps")

    _loop0: asyncio.AbstractEventLoop | None  # the loop while unbound; None once bound
    _asked: _Asked | None
    _coro0: Any
    first_result: Any
    steps: Generator[Any, None, None]

    @classmethod
    def new(cls, loop: asyncio.AbstractEventLoop) -> EagerTask:
        task: EagerTask = cls.__new__(cls)  # Task.__init__ deferred to bind()
        task._loop0 = loop
        task._asked = None
        task._coro0 = None
        return task

    def _ask(self) -> _Asked:
        asked = self._asked
        if asked is None:
            asked = self._asked = _Asked()
        return asked

    def bind(self, coro: Coroutine[Any, Any, Any], context: contextvars.Context) -> None:
        """Become a real task running ``coro`` (scheduled now), with what was asked so far."""
        loop, asked = self._loop0, self._asked
        assert loop is not None
        self._loop0 = self._asked = self._coro0 = None
        if asked is None:
            asyncio.Task.__init__(self, coro, loop=loop,  # type: ignore[call-arg]
                                  name=f"Task-eager-{next(_names)}", context=context)
            return
        asyncio.Task.__init__(self, coro, loop=loop,  # type: ignore[call-arg]
                              name=self._name(asked), context=context)
        for fn, ctx in asked.callbacks:
            super().add_done_callback(fn, context=ctx)
        extra = asked.cancels
        if asked.must_cancel:
            super().cancel(asked.message)
            extra -= 1
        for _ in range(extra):
            super().cancel(asked.message)
        for _ in range(-extra):
            super().uncancel()  # type: ignore[misc]

    def awaited(self) -> bool:
        """After a first step that ended: True if done callbacks wait on this task.

        Then the task is bound to a coroutine that returns at once, so that it ends as a task
        (cancelled if a cancellation was asked) and the callbacks run, as with a task that ran
        the state from the start.
        """
        asked = self._asked
        if asked is None or not asked.callbacks:
            return False
        self.first_result = None
        self.bind(_ended(), contextvars.Context())
        return True

    @staticmethod
    def _name(asked: _Asked) -> str:
        if asked.name is None:
            asked.name = f"Task-eager-{next(_names)}"
        return asked.name

    # -- the Task surface while unbound (bound: asyncio.Task's own) --------------------------

    def cancel(self, msg: Any = None) -> bool:
        if self._loop0 is None:
            return super().cancel(msg)
        asked = self._ask()
        asked.cancels += 1
        asked.must_cancel = True
        asked.message = msg
        return True

    def cancelling(self) -> int:
        if self._loop0 is None:
            return super().cancelling()  # type: ignore[misc,no-any-return]
        return 0 if self._asked is None else self._asked.cancels

    def uncancel(self) -> int:
        if self._loop0 is None:
            return super().uncancel()  # type: ignore[misc,no-any-return]
        asked = self._ask()
        if asked.cancels > 0:
            asked.cancels -= 1
        return asked.cancels

    def done(self) -> bool:
        return False if self._loop0 is not None else super().done()

    def cancelled(self) -> bool:
        return False if self._loop0 is not None else super().cancelled()

    def result(self) -> Any:
        if self._loop0 is not None:
            raise asyncio.InvalidStateError("Result is not set.")
        return super().result()

    def exception(self) -> BaseException | None:
        if self._loop0 is not None:
            raise asyncio.InvalidStateError("Exception is not set.")
        return super().exception()

    def add_done_callback(self, fn: Callable[[Any], object], *,
                          context: contextvars.Context | None = None) -> None:
        if self._loop0 is None:
            super().add_done_callback(fn, context=context)
        else:
            self._ask().callbacks.append((fn, context))

    def remove_done_callback(self, fn: Callable[[Any], object]) -> int:
        if self._loop0 is None:
            return super().remove_done_callback(fn)
        asked = self._ask()
        kept = [(f, c) for f, c in asked.callbacks if f != fn]
        removed = len(asked.callbacks) - len(kept)
        asked.callbacks = kept
        return removed

    def get_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop0
        return super().get_loop() if loop is None else loop

    def get_name(self) -> str:
        return super().get_name() if self._loop0 is None else self._name(self._ask())

    def set_name(self, value: object) -> None:
        if self._loop0 is None:
            super().set_name(value)
        else:
            self._ask().name = str(value)

    def get_coro(self) -> Any:
        return super().get_coro() if self._loop0 is None else self._coro0

    def get_stack(self, *, limit: int | None = None) -> list[Any]:
        return [] if self._loop0 is not None else super().get_stack(limit=limit)

    def print_stack(self, *, limit: int | None = None, file: Any = None) -> None:
        if self._loop0 is None:
            super().print_stack(limit=limit, file=file)

    def __repr__(self) -> str:
        if self._loop0 is None:
            return super().__repr__()
        return f"<EagerTask pending name={self.get_name()!r} (first step)>"


DONE: Any = object()  # what first_step() returns when the coroutine ended in its first step


def first_step(loop: asyncio.AbstractEventLoop, task: EagerTask, context: contextvars.Context,
               func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Call ``func`` and run its coroutine to its first wait, as ``task``, in ``context``.

    Returns :data:`DONE` when the coroutine returned (its result is ``task.first_result``), or
    what it yielded when it waits (then hand ``task.steps`` to a :class:`Resume`). Raises what
    the coroutine raised. A coroutine that returns raises no ``StopIteration`` on the way: the
    steps run as a generator driven by ``next(steps, DONE)``.
    """
    steps = task.steps = _steps(task, func, args, kwargs)
    if _swap is not None:
        previous = _swap(loop, task)
        try:
            return context.run(next, steps, DONE)
        finally:
            _swap(loop, previous)
    current = _current
    assert current is not None
    previous = current.get(loop)
    current[loop] = task
    try:
        return context.run(next, steps, DONE)
    finally:
        if previous is None:
            current.pop(loop, None)
        else:
            current[loop] = previous


@types.coroutine
def _steps(task: EagerTask, func: Callable[..., Any], args: tuple[Any, ...],
           kwargs: dict[str, Any]) -> Generator[Any, None, None]:
    """The state's coroutine, stepped; its result lands on ``task.first_result``."""
    awaitable = task._coro0 = func(*args, **kwargs)
    if type(awaitable) is not CoroutineType:
        awaitable = awaitable.__await__()  # an awaitable that is not a native coroutine
    task.first_result = yield from awaitable


class Resume:
    """Await the state's coroutine that :func:`first_step` left waiting on ``yielded``.

    Its first step (taken by :func:`prime`, outside any task) only parks; the task's first step
    hands ``yielded`` to the task, which then waits on it as if it had started the coroutine
    itself. A cancellation that reaches the task before that is thrown into the coroutine at the
    await where it stopped (the future it waited on is cancelled, as a task would).
    """

    __slots__ = ("task", "yielded")

    def __init__(self, task: EagerTask, yielded: Any) -> None:
        self.task = task
        self.yielded = yielded

    def __await__(self) -> Generator[Any, None, Any]:
        return self._go(_PARKED, self.yielded)

    def _go(self, *handed: Any) -> Generator[Any, None, Any]:
        """Yield ``handed`` in turn (each as a task step), then go on with the coroutine."""
        steps = self.task.steps
        for value in handed:
            try:
                yield value
            except GeneratorExit:
                steps.close()
                raise
            except BaseException as exc:
                return (yield from self._thrown(exc))
        yield from steps
        return self._result()

    def _thrown(self, exc: BaseException) -> Generator[Any, None, Any]:
        """Throw what reached the task into the coroutine, at the await where it stopped."""
        waited = self.yielded
        if isinstance(waited, asyncio.Future) and not waited.done():
            waited.cancel()  # as a task cancels the future it waits on
        try:
            nxt = self.task.steps.throw(exc)
        except StopIteration:
            return self._result()
        return (yield from Resume(self.task, nxt)._go(nxt))

    def _result(self) -> Any:
        task = self.task
        result, task.first_result = task.first_result, None
        return result


async def _ended() -> None:
    return None


_PARKED = object()


def prime(coro: Coroutine[Any, Any, Any]) -> None:
    """Run ``coro`` up to the parking step of the :class:`Resume` it awaits first."""
    parked = coro.send(None)
    if parked is not _PARKED:  # pragma: no cover - a misuse of this module
        raise RuntimeError("eager.prime(): the coroutine must await a Resume first")
