"""State: validation, function names, the prepared call, enter_state."""

from __future__ import annotations

import asyncio
import functools

import pytest

from statepool.engine import State, StateHandle, StateManager, StateStatus
from statepool.engine.naming import func_name
from statepool.executors import InlineExecutor


async def acoro(x: int = 1) -> int:
    return x


def plain(x: int = 1) -> int:
    return x + 1


class Thing:
    def method(self) -> None: ...

    @classmethod
    def klass(cls) -> None: ...

    def __call__(self) -> None: ...


class AsyncCallable:
    async def __call__(self) -> int:
        return 7


# (kwargs, exception type, words the message must hold)
BAD_INPUT = [
    (dict(name="", func=plain), ValueError, ["name"]),
    (dict(name=3, func=plain), ValueError, ["name"]),
    (dict(name="s", func=42), TypeError, ["'s'", "'func'"]),
    (dict(name="s", func=plain, lazy_args="abc"), TypeError, ["'s'", "'lazy_args'"]),
    (dict(name="s", func=plain, lazy_args=5), TypeError, ["'s'", "'lazy_args'"]),
    (dict(name="s", func=plain, args={1}), TypeError, ["'s'", "'args'"]),
    (dict(name="s", func=plain, lazy_kwargs=[1]), TypeError, ["'s'", "'lazy_kwargs'"]),
    (dict(name="s", func=plain, kwargs={1: 2}), TypeError, ["'s'", "'kwargs'"]),
    (dict(name="s", func=plain, event=object()), TypeError, ["'s'", "'event'"]),
    (dict(name="s", func=plain, event=asyncio.Event(), event_to_wait=asyncio.Event()),
     ValueError, ["'s'", "event_to_wait"]),
    (dict(name="s", func=plain, executor="nope"), ValueError,
     ["'s'", "'executor'", "inline", "thread", "process", "aioprocess", "dask"]),
    (dict(name="s", func=plain, executor=3.5), TypeError, ["'s'", "'executor'"]),
    (dict(name="s", func=plain, timeout=0), ValueError, ["'s'", "'timeout'"]),
    (dict(name="s", func=plain, timeout=-1.5), ValueError, ["'s'", "'timeout'"]),
    (dict(name="s", func=plain, timeout="1"), TypeError, ["'s'", "'timeout'"]),
    (dict(name="s", func=plain, retries=-1), ValueError, ["'s'", "'retries'"]),
    (dict(name="s", func=plain, retries=1.5), ValueError, ["'s'", "'retries'"]),
    (dict(name="s", func=plain, is_blocking=True, executor="inline"), ValueError,
     ["'s'", "'executor'", "freeze"]),
]


@pytest.mark.parametrize(("kwargs", "exc_type", "words"), BAD_INPUT)
def test_bad_input_names_state_and_field(kwargs, exc_type, words) -> None:
    with pytest.raises(exc_type) as info:
        State(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_event_alias_is_the_gate() -> None:
    event = asyncio.Event()
    assert State("s", plain, event_to_wait=event).event is event
    assert State("s", plain, event=event).event is event


@pytest.mark.parametrize(
    ("func", "is_blocking", "executor"),
    [
        (acoro, False, "inline"),
        (acoro, True, "inline"),
        (plain, False, "inline"),
        (plain, True, "thread"),
        (functools.partial(acoro, 2), True, "inline"),
        (AsyncCallable(), False, "inline"),
    ],
)
def test_default_executor(func, is_blocking, executor) -> None:
    assert State("s", func, is_blocking).executor_name == executor


def test_executor_instance_is_accepted() -> None:
    ex = InlineExecutor()
    state = State("s", acoro, executor=ex)
    assert state.executor is ex and state.executor_name == "inline"


def test_blocking_coroutine_may_run_inline() -> None:
    assert State("s", acoro, True, executor="inline").executor_name == "inline"


@pytest.mark.parametrize(
    ("func", "expected"),
    [
        (plain, "plain"),
        (functools.partial(functools.partial(plain, 1)), "plain"),
        (Thing().method, "Thing.method"),
        (Thing.klass, "Thing.klass"),
        (Thing(), "Thing"),
        (len, "len"),
    ],
)
def test_func_name(func, expected) -> None:
    assert func_name(func) == expected


def test_func_name_of_lambda_has_file_and_line() -> None:
    fn = lambda: None  # noqa: E731
    name = func_name(fn)
    assert name.startswith("<lambda> (") and __file__ in name
    assert name.endswith(f":{fn.__code__.co_firstlineno})")


def test_is_coro() -> None:
    assert State("s", acoro).is_coro
    assert State("s", AsyncCallable()).is_coro
    assert State("s", functools.partial(acoro, 1)).is_coro
    assert not State("s", plain).is_coro


def test_make_function_order_of_arguments() -> None:
    def f(*args: object, **kwargs: object) -> tuple[object, object]:
        return args, kwargs

    state = State("s", f, args=(1, 2), kwargs={"a": 1})
    call = state._make_function((1, 2, 3), {"a": 1, "b": 2})
    assert call() == ((1, 2, 3), {"a": 1, "b": 2})
    assert call.state_name == "s" and call.func_name == "f" and not call.is_coro


async def test_lazy_resolution_order_and_kinds() -> None:
    async def later() -> str:
        return "awaited"

    def f(*args: object, **kwargs: object) -> tuple[object, object]:
        return args, kwargs

    state = State("s", f, args=("fixed", print), lazy_args=(lambda: "called", later, 5),
                  kwargs={"k": 1}, lazy_kwargs={"lk": later})
    args, kwargs = await state._resolve_lazy()
    assert args == ("fixed", print, "called", "awaited", 5)
    assert kwargs == {"k": 1, "lk": "awaited"}


async def test_enter_state_runs_now_and_returns_result() -> None:
    try:
        assert await State("s", acoro, args=(5,)).enter_state() == 5
        assert await State("p", plain, args=(5,)).enter_state() == 6
        with pytest.raises(ZeroDivisionError):
            await State("z", lambda: 1 / 0).enter_state()
    finally:
        StateManager.instance().signal_stopping()
        await StateManager.instance().join()


async def test_enter_state_blocking_returns_handle_once_dispatched() -> None:
    release = asyncio.Event()

    async def service() -> str:
        await release.wait()
        return "done"

    manager = StateManager.instance()
    handle = await State("svc", service, is_blocking=True).enter_state()
    assert isinstance(handle, StateHandle)
    assert not handle.done()
    release.set()
    assert await handle == "done"
    assert handle.status is StateStatus.SUCCEEDED
    manager.signal_stopping()


def test_derived_attributes_are_read_only() -> None:
    state = State("s", acoro)
    for attr in ("func_name", "is_coro", "executor_name"):
        with pytest.raises(AttributeError):
            setattr(state, attr, "x")
    assert state.func_name == "acoro" and state.is_coro and state.executor_name == "inline"
