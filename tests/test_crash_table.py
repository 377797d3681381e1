"""The crash table, in the style of loky's and CPython's ``concurrent.futures`` crash tests.

For every executor that carries calls to another process (``"process"``, ``"aioprocess"``), each
stage of a call's way there and back (the parent pickles it, the worker unpickles it, runs it,
pickles the result, the parent unpickles it) raises every kind of exception (``Exception``,
``StopIteration``, ``GeneratorExit``, ``KeyboardInterrupt``, ``SystemExit``, a user's own
``BaseException``) or, in the worker, ends the process (``os._exit``, ``SIGKILL``). The threads
and the loop (``"thread"``, ``"inline"``) get the ``run`` row. Whatever happens:

* the state ends ``FAILED`` (never hangs, never ``CANCELLED``), with an error that keeps the
  original type (an ``Exception`` raised by the function) or names the state;
* nothing leaves the loop but ``KeyboardInterrupt``/``SystemExit`` raised by a state's own code
  on the loop thread (``"inline"``), as SPEC says;
* the executor carries on: the next state on it succeeds;
* the manager stops in bounded time and leaves no process or thread (the conftest checks).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import _attacks
import pytest
from _attacks import CRASHES, IN_PARENT, RAISES, STAGES

from statepool.engine import State, StateManager, StateStatus
from statepool.engine.errors import EngineError
from statepool.engine.timings import worker_of
from statepool.executors import AioProcessExecutor, InlineExecutor, LokyExecutor, ThreadExecutor
from statepool.executors.base import Executor

DEADLINE_S = 15.0
STOP_S = 8.0
NAME = "victim"


def executor(name: str) -> Executor:
    if name == "process":
        return LokyExecutor(1)
    if name == "aioprocess":
        return AioProcessExecutor(1, 4)
    if name == "thread":
        return ThreadExecutor(2)
    return InlineExecutor()


def cases() -> list[Any]:
    out = []
    for ex in ("process", "aioprocess"):
        for stage in STAGES:
            kinds = RAISES if stage in IN_PARENT else RAISES + CRASHES
            for kind in kinds:
                out.append(pytest.param(ex, stage, kind, id=f"{ex}-{stage}-{kind}"))
        out.append(pytest.param(ex, "run", "unpicklable", id=f"{ex}-run-unpicklable"))
    for kind in RAISES:
        for options in ("plain", "timeout"):
            out.append(pytest.param("thread", "run", kind + ":" + options,
                                    id=f"thread-run-{kind}-{options}"))
    for kind in RAISES:
        if kind in ("keyboardinterrupt", "systemexit"):
            continue  # they leave the loop: test_basexc.py
        for options in ("plain", "timeout"):
            for coro in (False, True):
                flavour = "coro" if coro else "fn"
                out.append(pytest.param("inline", "run", f"{kind}:{options}:{int(coro)}",
                                        id=f"inline-run-{kind}-{options}-{flavour}"))
    return out


def victim(ex_name: str, stage: str, kind: str) -> State:
    parts = kind.split(":")
    kind = parts[0]
    options: dict[str, Any] = {}
    if len(parts) > 1 and parts[1] == "timeout":
        options["timeout"] = 30.0
    coro = ex_name == "aioprocess" or (len(parts) > 2 and parts[2] == "1")
    blocking = ex_name != "inline"
    parent = os.getpid()
    if stage in ("dumps_arg", "loads_arg"):
        fn: Any = _attacks.take_trap_async if coro else _attacks.take_trap
        args: tuple[Any, ...] = (_attacks.Trap(stage, kind, parent),)
    elif stage == "run":
        fn = _attacks.raise_kind_async if coro else _attacks.raise_kind
        args = (kind,)
    else:
        fn = _attacks.make_trap_async if coro else _attacks.make_trap
        args = (stage, kind, parent)
    return State(NAME, fn, blocking, args=args, executor=ex_name, **options)


def check_error(ex_name: str, stage: str, kind: str, exc: BaseException | None) -> None:
    assert exc is not None
    kind = kind.split(":")[0]
    if stage in ("run", "loads_arg") and kind == "exception":
        assert isinstance(exc, ValueError), repr(exc)  # the function's own: its type is kept
        return
    if stage == "run" and kind == "stopiteration" and ex_name == "aioprocess":
        assert isinstance(exc, RuntimeError), repr(exc)  # in a coroutine: PEP 479's error
        return
    if ex_name in ("thread", "inline") and stage == "run":
        if kind == "stopiteration":  # a coroutine turns it into RuntimeError (PEP 479)
            assert isinstance(exc, (StopIteration, RuntimeError)), repr(exc)
        else:  # a thread or the loop: the state's own exception, as it was raised
            assert type(exc).__name__.lower().replace("_", "") in (kind, "userbase"), repr(exc)
        return
    # from another process: an Exception, never a raw BaseException, naming the state
    assert isinstance(exc, Exception), repr(exc)
    assert isinstance(exc, (EngineError, StopIteration, RuntimeError)), repr(exc)
    assert repr(NAME) in str(exc), str(exc)


@pytest.mark.parametrize(("ex_name", "stage", "kind"), cases())
async def test_crash_table(ex_name: str, stage: str, kind: str) -> None:
    ex = executor(ex_name)
    manager = StateManager(executors={ex_name: ex})
    main = asyncio.ensure_future(manager.process_states())
    try:
        handle = await manager.put_state(victim(ex_name, stage, kind))
        await asyncio.wait([main, asyncio.ensure_future(_ended(handle))],
                           timeout=DEADLINE_S, return_when=asyncio.FIRST_COMPLETED)
        assert not main.done(), f"the main loop died: {main.exception()!r}"
        assert handle.done(), f"{handle} did not end within {DEADLINE_S} s"
        assert handle.status is StateStatus.FAILED, handle
        check_error(ex_name, stage, kind, handle._exception)
        follow = State("after", _attacks.answer_async if ex_name == "aioprocess"
                       else _attacks.answer, ex_name != "inline", args=(7,), executor=ex_name)
        after = await manager.put_state(follow)
        assert await asyncio.wait_for(after, DEADLINE_S) == 7  # the executor carries on
    finally:
        manager.signal_stopping()
        began = time.monotonic()
        await asyncio.wait([main], timeout=STOP_S + 2)
        assert main.done() and time.monotonic() - began < STOP_S, "stop was not bounded"
    assert main.exception() is None


@pytest.mark.parametrize("ex_name", ["process", "aioprocess"])
async def test_a_result_computed_before_an_argument_kills_its_worker_is_delivered(
        ex_name: str) -> None:
    """The worker dies as it releases the call's arguments (a ``__del__``), after the function
    returned: the outcome left first, so the computed result is delivered (as in loky)."""
    fn: Any = _attacks.answer_holding_async if ex_name == "aioprocess" \
        else _attacks.answer_holding
    ex = executor(ex_name)
    async with StateManager(executors={ex_name: ex}) as manager:
        for i in range(3):  # each time a new worker, which dies the same way
            handle = await manager.put_state(State(f"kept{i}", fn, True,
                                                   args=(11 + i, _attacks.ExitsOnDel()),
                                                   executor=ex_name))
            assert await asyncio.wait_for(handle, DEADLINE_S) == 11 + i
            # the next call goes to the next worker (one sent to a dying one would fail too)
            dead = worker_of(handle)
            assert isinstance(dead, int)
            deadline = time.monotonic() + DEADLINE_S
            while dead in ex.worker_pids():
                assert time.monotonic() < deadline, f"worker {dead} did not die"
                await asyncio.sleep(0.01)
        follow = State("after", _attacks.answer_async if ex_name == "aioprocess"
                       else _attacks.answer, True, args=(1,), executor=ex_name)
        after = await manager.put_state(follow)
        assert await asyncio.wait_for(after, DEADLINE_S) == 1  # the executor carries on


async def _ended(handle: Any) -> None:
    while not handle.done():
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("ex_name", ["process", "aioprocess"])
async def test_a_remote_traceback_through_code_carried_by_value_keeps_file_and_line(
        ex_name: str) -> None:
    """cloudpickle writes ``<dynamic-code>`` as the file of code it carries by value (a
    function of ``__main__``, a lambda); loky's traceback shows the file and the line."""
    import inspect

    from statepool.executors._wire.remote import RemoteTraceback

    def by_value(x: int) -> None:  # a local function: cloudpickle carries it by value
        raise ValueError(f"by value {x}")

    async def by_value_async(x: int) -> None:
        raise ValueError(f"by value {x}")

    fn: Any = by_value_async if ex_name == "aioprocess" else by_value
    line = inspect.getsourcelines(fn)[1] + 1
    async with StateManager(executors={ex_name: executor(ex_name)}) as manager:
        handle = await manager.put_state(State("tb", fn, True, args=(1,), executor=ex_name))
        with pytest.raises(ValueError, match="by value 1") as info:
            await asyncio.wait_for(handle, DEADLINE_S)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert f'File "{__file__}", line {line}, in {fn.__name__}' in cause.tb, cause.tb
    assert "<dynamic-code>" not in cause.tb
