"""BLAS / OpenMP thread limits inside workers (``inner_threads``, ``executors/_wire/threads.py``).

``"process"`` and ``"aioprocess"`` workers start with ``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``
and the rest of that family set to ``max(1, usable cores // workers)``, a value set in the parent's
environment kept; ``inner_threads=n`` sets ``n``; ``None`` leaves them alone. threadpoolctl
reports the limit in a worker where numpy was imported before (by an earlier state, or by an
initializer that raised the limit), and the parent's own environment and libraries never change.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import cloudpickle
import pytest

from statepool.executors import AioProcessExecutor, LokyExecutor, ThreadExecutor
from statepool.executors._wire import threads
from statepool.executors.base import Executor, PreparedCall

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import this file

VARIABLES = threads.VARIABLES
WORKERS = 2


def default_limit() -> str:
    return str(max(1, threads.usable_cores() // WORKERS))


# -- what runs in the workers --------------------------------------------------------------------


def read_env() -> dict[str, str | None]:
    import os

    return {var: os.environ.get(var) for var in (*VARIABLES, "ENABLE_IPC")}


async def aread_env() -> dict[str, str | None]:
    return read_env()


def import_numpy() -> int:
    import numpy

    return int(numpy.ones(4).sum())


def blas_threads() -> list[int]:
    """What threadpoolctl says the loaded BLAS libraries use (numpy imported earlier)."""
    import numpy
    from threadpoolctl import threadpool_info

    assert numpy.__name__ == "numpy"
    return sorted({info["num_threads"] for info in threadpool_info()
                   if info["user_api"] == "blas"})


async def ablas_threads() -> list[int]:
    return blas_threads()


def unlimit_numpy(threads_: int) -> None:
    """An initializer that imports numpy and raises its BLAS limit, as a library would."""
    import numpy
    from threadpoolctl import threadpool_limits

    assert numpy.__name__ == "numpy"
    threadpool_limits(limits=threads_, user_api="blas")


# -- helpers -------------------------------------------------------------------------------------


def call(fn: Callable[..., Any], *args: Any) -> PreparedCall:
    return PreparedCall(fn.__name__, fn.__name__, fn, args, {},
                        is_coro=inspect.iscoroutinefunction(fn))


@contextlib.asynccontextmanager
async def started(ex: Executor) -> AsyncIterator[Executor]:
    await ex.start()  # type: ignore[attr-defined]
    try:
        yield ex
    finally:
        await ex.shutdown(cancel=True)


def process(**options: Any) -> LokyExecutor:
    return LokyExecutor(WORKERS, **options)


def aioprocess(**options: Any) -> AioProcessExecutor:
    return AioProcessExecutor(WORKERS, **options)


KINDS = [pytest.param(process, read_env, id="process"),
         pytest.param(aioprocess, aread_env, id="aioprocess")]


OURS = (*VARIABLES, "ENABLE_IPC", threads.MARK)


def parent_limits() -> tuple[dict[str, str | None], list[int]]:
    """This process's variables and its BLAS pools' sizes."""
    return {var: os.environ.get(var) for var in OURS}, blas_threads()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, str | None], list[int]]:
    """No limit set in this process's environment; answers :func:`parent_limits`."""
    for var in OURS:
        monkeypatch.delenv(var, raising=False)
    return parent_limits()


# -- the variables in a worker -------------------------------------------------------------------


@pytest.mark.parametrize(("make", "fn"), KINDS)
async def test_default_is_cores_over_workers_and_the_parent_is_unchanged(
        make: Any, fn: Any, clean_env: Any) -> None:
    async with started(make()) as ex:
        env = await ex.run(call(fn))
    assert env == {**dict.fromkeys(VARIABLES, default_limit()), "ENABLE_IPC": "1"}
    assert parent_limits() == clean_env


@pytest.mark.parametrize(("make", "fn"), KINDS)
async def test_a_limit_set_in_the_parent_is_kept(make: Any, fn: Any, clean_env: Any,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv("ENABLE_IPC", "0")
    async with started(make()) as ex:
        env = await ex.run(call(fn))
    assert env["OMP_NUM_THREADS"] == "3"
    assert env["ENABLE_IPC"] == "0"
    assert {env[var] for var in VARIABLES if var != "OMP_NUM_THREADS"} == {default_limit()}


@pytest.mark.parametrize(("make", "fn"), KINDS)
async def test_the_option_sets_every_variable(make: Any, fn: Any, clean_env: Any,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MKL_NUM_THREADS", "7")  # the option wins over the environment
    async with started(make(inner_threads=3)) as ex:
        env = await ex.run(call(fn))
    assert {env[var] for var in VARIABLES} == {"3"}
    assert os.environ["MKL_NUM_THREADS"] == "7"


@pytest.mark.parametrize(("make", "fn"), KINDS)
async def test_none_leaves_the_libraries_alone(make: Any, fn: Any, clean_env: Any,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "5")
    async with started(make(inner_threads=None)) as ex:
        env = await ex.run(call(fn))
    assert env == {**dict.fromkeys(VARIABLES), "OPENBLAS_NUM_THREADS": "5", "ENABLE_IPC": None}


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "4", "all"])
def test_bad_option_names_the_field(bad: Any) -> None:
    for make in (LokyExecutor, AioProcessExecutor, ThreadExecutor):
        with pytest.raises(ValueError, match="inner_threads"):
            make(2, inner_threads=bad)


# -- threadpoolctl where numpy is loaded already ---------------------------------------------------


async def test_process_numpy_imported_by_an_earlier_state_runs_limited(
        clean_env: Any) -> None:
    async with started(LokyExecutor(1, inner_threads=1)) as ex:  # one worker: the same one
        assert await ex.run(call(import_numpy)) == 4
        assert await ex.run(call(blas_threads)) == [1]


async def test_aioprocess_initializer_that_loaded_numpy_still_runs_limited(
        clean_env: Any) -> None:
    """The initializer imports numpy and raises its limit: the limit is applied again after it
    (without that, threadpoolctl would report 2)."""
    ex = AioProcessExecutor(1, inner_threads=1, initializer=unlimit_numpy, initargs=(2,))
    async with started(ex):
        assert await ex.run(call(ablas_threads)) == [1]


async def test_process_initializer_that_loaded_numpy_still_runs_limited(
        clean_env: Any) -> None:
    ex = LokyExecutor(1, inner_threads=1, initializer=unlimit_numpy, initargs=(2,))
    async with started(ex):
        assert await ex.run(call(blas_threads)) == [1]


async def test_process_worker_applies_the_limit_to_what_is_loaded() -> None:
    """In a worker whose limits statepool set, ``apply_loaded`` limits numpy loaded before."""
    async with started(LokyExecutor(1, inner_threads=1)) as ex:
        assert await ex.run(call(_unlimited_then_applied)) == ([2], [1])


def _unlimited_then_applied() -> tuple[list[int], list[int]]:
    from statepool.executors._wire.threads import apply_loaded

    unlimit_numpy(2)
    before = blas_threads()
    assert apply_loaded()
    return before, blas_threads()


def test_nothing_is_applied_where_statepool_set_no_limit() -> None:
    assert threads.apply_loaded({"OMP_NUM_THREADS": "1"}) is False


# -- "thread" ------------------------------------------------------------------------------------


async def test_thread_cap_holds_in_its_threads_and_is_restored_at_shutdown() -> None:
    import numpy  # noqa: F401 - loaded before the executor starts
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=2, user_api="blas"):
        before = blas_threads()
        ex = ThreadExecutor(2, inner_threads=1)
        try:
            inside = await asyncio.gather(*(ex.run(call(blas_threads)) for _ in range(4)))
        finally:
            await ex.shutdown(cancel=False)
        assert inside == [[1]] * 4
        assert blas_threads() == before
