"""The ``"dask"`` executor: a LocalCluster it starts, and a cluster started apart with the CLI.

Most tests start their own two-worker LocalCluster through the executor (about a second each) and
end with no process left. The CLI cluster (``dask scheduler`` / ``dask worker``) is shared by the
module; the ``no_leaks`` fixture below replaces conftest's: it ignores that cluster's processes
(a killed worker's nanny starts a new one) and distributed's interpreter-wide offload thread, and
the cluster's own fixture checks at the end of the module that all its processes are gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import json
import os
import pathlib
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import numpy as np
import psutil
import pytest
from conftest import LEAK_GRACE_S, _wait_until, live_children

from statepool.engine import State, StateManager, StateStatus
from statepool.engine.errors import SerializationError, StateTimeoutError, WorkerCrashedError
from statepool.executors import registry
from statepool.executors._wire.remote import RemoteTraceback
from statepool.executors.base import PreparedCall
from statepool.executors.dask import DaskExecutor
from statepool.executors.dask.support import translate_error

ROOT = pathlib.Path(__file__).resolve().parent.parent
DASK_CLI = pathlib.Path(sys.executable).with_name("dask")
SHARED_THREADS = ("Dask-Offload",)  # distributed's module-level pool, alive until exit

# -- what the workers run (module level: workers import this module by name) ----------------


def add(a: int, b: int) -> int:
    return a + b


async def double_later(x: int) -> tuple[int, int]:
    await asyncio.sleep(0.01)
    return os.getpid(), 2 * x


def blas_env() -> dict[str, str | None]:
    return {var: os.environ.get(var) for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                 "MKL_NUM_THREADS", "STATEPOOL_INNER_THREADS")}


def raise_value_error(text: str) -> None:
    raise ValueError(text)


def call_sys_exit() -> None:
    sys.exit(3)


def exit_process() -> None:
    os._exit(7)


def return_lock() -> threading.Lock:
    return threading.Lock()


def spin_until(release: str, marker: str | None = None, limit: float = 30.0) -> int:
    """Write ``marker`` (the worker's pid), then burn CPU until ``release`` exists."""
    if marker is not None:  # written whole, then renamed: a reader never sees it half done
        pathlib.Path(marker + ".tmp").write_text(str(os.getpid()))
        os.replace(marker + ".tmp", marker)
    deadline = time.monotonic() + limit
    while not os.path.exists(release) and time.monotonic() < deadline:
        sum(range(10_000))
    return os.getpid()


def hold_gil(marker: str, seconds: int) -> int:
    """Write ``marker`` (the worker's pid), then sleep ``seconds`` in C holding the GIL (a
    ``PyDLL`` call keeps it): the worker's event loop cannot run meanwhile."""
    pathlib.Path(marker + ".tmp").write_text(str(os.getpid()))
    os.replace(marker + ".tmp", marker)
    ctypes.PyDLL(None).sleep(seconds)
    return os.getpid()


def touch(path: str) -> str:
    pathlib.Path(path).write_text("ran")
    return path


def checksum(a: np.ndarray, scale: int = 1) -> int:
    return int(a.sum()) * scale


# -- fixtures and helpers ----------------------------------------------------------------------


class _ExternalCluster:
    """CLI processes, each leading its own process group: their workers stay in the group."""

    def __init__(self, address: str, procs: list[subprocess.Popen[bytes]]) -> None:
        self.address = address
        self.procs = procs

    def pids(self) -> set[int]:
        """Every live process of the groups (worker processes come and go)."""
        groups = {popen.pid for popen in self.procs}
        out: set[int] = set()
        for proc in psutil.process_iter():
            with contextlib.suppress(OSError, psutil.Error):
                if os.getpgid(proc.pid) in groups and _alive(proc.pid) and any(
                        "dask" in part or "multiprocessing" in part for part in proc.cmdline()):
                    out.add(proc.pid)
        return out


_external: list[_ExternalCluster] = []


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """conftest's check, less the module's CLI cluster and distributed's offload thread."""
    threads_before = set(threading.enumerate())
    children_before = live_children()
    yield
    StateManager._reset_instance()

    def new_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t not in threads_before and t.is_alive()
                and not t.name.startswith(SHARED_THREADS)]

    def new_children() -> set[int]:
        found = live_children() - children_before
        # walked after: a worker the CLI cluster's nanny starts meanwhile is counted as its own
        shared = set().union(*(c.pids() for c in _external))
        return {pid for pid in found - shared if _alive(pid)}

    _wait_until(lambda: not new_threads() and not new_children(), LEAK_GRACE_S)
    threads, children = new_threads(), new_children()
    assert not threads, f"test left threads running: {[t.name for t in threads]}"
    assert not children, f"test left child processes: {_describe(children)}"


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _describe(pids: set[int]) -> list[str]:
    out = []
    for pid in sorted(pids):
        try:
            proc = psutil.Process(pid)
            out.append(f"{pid} (parent {proc.ppid()}, {proc.status()}): "
                       f"{' '.join(proc.cmdline())[:200]}")
        except psutil.Error:
            out.append(f"{pid} (gone)")
    return out


@pytest.fixture(scope="module")
def external_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_ExternalCluster]:
    """``dask scheduler`` and ``dask worker --nworkers 2`` on loopback, as on other machines."""
    tmp = tmp_path_factory.mktemp("dask-cli")
    sched_file = tmp / "scheduler.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    common: dict[str, Any] = {"cwd": tmp, "env": env, "stdout": subprocess.DEVNULL,
                              "stderr": subprocess.DEVNULL, "start_new_session": True}
    procs = [subprocess.Popen([str(DASK_CLI), "scheduler", "--host", "127.0.0.1", "--port", "0",
                               "--no-dashboard", "--scheduler-file", str(sched_file)], **common)]
    cluster = _ExternalCluster("", procs)
    _external.append(cluster)
    try:
        assert _wait_until(sched_file.exists, 30), "dask scheduler did not start"
        _wait_until(lambda: bool(sched_file.read_text().strip()), 5)
        cluster.address = json.loads(sched_file.read_text())["address"]
        procs.append(subprocess.Popen(
            [str(DASK_CLI), "worker", cluster.address, "--nworkers", "2", "--nthreads", "1",
             "--host", "127.0.0.1", "--no-dashboard"], **common))
        yield cluster
    finally:
        for popen in reversed(procs):  # a graceful stop: the nannies close their workers
            popen.terminate()
            try:
                popen.wait(15)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(5)
        gone = _wait_until(lambda: not cluster.pids(), 10)
        left = cluster.pids()
        for pid in left:  # do not leave them to the next module
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
        _external.remove(cluster)
        assert gone, f"the CLI cluster left processes: {_describe(left)}"


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def n_workers(ex: DaskExecutor, n: int, timeout: float = 10.0) -> None:
    await asyncio.wait_for(ex.client.wait_for_workers(n), timeout)


def call(name: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> PreparedCall:
    return PreparedCall(name, getattr(fn, "__name__", "fn"), fn, args, kw,
                        is_coro=asyncio.iscoroutinefunction(fn))


@contextlib.asynccontextmanager
async def releasing(release: pathlib.Path, *args: Any,
                    **options: Any) -> AsyncIterator[DaskExecutor]:
    """An executor for calls that spin until ``release`` exists: at the end of the block
    ``release`` is touched (the spinners stop), then the executor shut down (``cancel=True``)."""
    ex = DaskExecutor(*args, **options)
    try:
        yield ex
    finally:
        release.touch()
        await ex.shutdown(cancel=True)


# -- a LocalCluster of its own -----------------------------------------------------------------


async def test_results_coroutines_loopback_and_own_cluster_lifecycle(pids_gone: Any) -> None:
    ex = DaskExecutor(n_workers=2)
    assert ex.worker_pids() == []
    await ex.start()
    try:
        pids = ex.worker_pids()
        assert len(pids) == 2 and set(pids) <= {p.pid for p in psutil.Process().children(True)}
        starts: list[str] = []
        c = PreparedCall("add", "add", add, (2, 3), on_start=lambda: starts.append("add"))
        assert await ex.run(c) == 5 and starts == ["add"]
        pid, value = await ex.run(call("double", double_later, 21))
        assert value == 42 and pid in pids
        # TLS with temporary credentials where cryptography is installed (the dask extra)
        import importlib.util

        scheme = "tls" if importlib.util.find_spec("cryptography") else "tcp"
        assert ex.client.scheduler.address.startswith(f"{scheme}://127.0.0.1:")
        assert "connected" in repr(ex)
        # every listening socket (scheduler, nannies, workers, HTTP routes) is on loopback
        procs = [psutil.Process(), *(psutil.Process(p) for p in pids)]
        listening = [conn.laddr for proc in procs for conn in proc.net_connections("inet")
                     if conn.status == psutil.CONN_LISTEN]
        assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening
        assert 8787 not in {addr.port for addr in listening}  # no dashboard
        # Dask's nanny limits the BLAS / OpenMP threads of its workers itself
        # (distributed.nanny.pre-spawn-environ: 1, a value set here kept): statepool keeps
        # that and adds nothing
        assert await ex.run(call("env", blas_env)) == {
            **{var: os.environ.get(var, "1") for var in ("OMP_NUM_THREADS",
                                                         "OPENBLAS_NUM_THREADS",
                                                         "MKL_NUM_THREADS")},
            "STATEPOOL_INNER_THREADS": None}
    finally:
        await ex.shutdown(cancel=True)
    assert pids_gone(pids, 10)
    await ex.shutdown(cancel=True)  # twice is fine
    with pytest.raises(RuntimeError, match="shut down"):
        await ex.run(call("late", add, 1, 1))


async def test_failures_keep_their_type_or_map_to_engine_errors() -> None:
    ex = DaskExecutor(n_workers=2)
    try:
        with pytest.raises(ValueError, match="bad input") as info:
            await ex.run(call("raiser", raise_value_error, "bad input"))
        assert isinstance(info.value.__cause__, RemoteTraceback)
        assert "raise_value_error" in str(info.value.__cause__)

        with pytest.raises(WorkerCrashedError, match=r"'exiter'.*sys.exit\(3\)") as crash:
            await ex.run(call("exiter", call_sys_exit))
        assert crash.value.state_name == "exiter" and crash.value.exitcode == 3

        with pytest.raises(SerializationError, match=r"'unpicklable'.*argument 0.*lock"):
            await ex.run(call("unpicklable", add, threading.Lock(), 1))

        with pytest.raises(SerializationError, match=r"'lock-result'.*lock"):
            await ex.run(call("lock-result", return_lock))

        assert await ex.run(call("still-fine", add, 1, 2)) == 3
    finally:
        await ex.shutdown(cancel=True)


async def test_worker_death_is_a_crash_of_that_state_only() -> None:
    ex = DaskExecutor(n_workers=2)
    try:
        await ex.start()
        t0 = time.monotonic()
        crash, fine = await asyncio.gather(
            ex.run(call("crasher", exit_process)), ex.run(call("bystander", add, 20, 22)),
            return_exceptions=True)
        assert isinstance(crash, WorkerCrashedError) and crash.state_name == "crasher"
        assert "'crasher'" in str(crash) and "died" in str(crash)
        assert fine == 42
        assert time.monotonic() - t0 < 10
        await n_workers(ex, 2)  # the nannies started new workers
        assert await ex.run(call("after", add, 1, 1)) == 2
    finally:
        await ex.shutdown(cancel=True)


async def test_cancel_running_state_ends_its_worker(tmp_path: pathlib.Path,
                                                   pids_gone: Any) -> None:
    marker, release = tmp_path / "started", tmp_path / "release"
    async with releasing(release, n_workers=2) as ex:
        task = asyncio.ensure_future(ex.run(call("spinner", spin_until, str(release),
                                                  str(marker))))
        await wait_for(marker.exists, 20)
        victim = int(marker.read_text())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pids_gone([victim], 5)  # the CPU work stopped with its process
        await wait_for(lambda: len(ex.worker_pids()) == 2 and victim not in ex.worker_pids())
        await n_workers(ex, 2)
        assert await ex.run(call("after", add, 2, 2)) == 4


async def test_cancel_ends_a_worker_whose_task_holds_the_gil(
        tmp_path: pathlib.Path, pids_gone: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker cannot answer its cancel mark: after MARK_TIMEOUT_S the scheduler (ours, in
    this process) says which worker has the task, and this process kills it, asking it nothing."""
    from statepool.executors.dask import executor as dask_executor

    monkeypatch.setattr(dask_executor, "MARK_TIMEOUT_S", 1.0)
    marker, release = tmp_path / "started", tmp_path / "release"
    async with releasing(release, n_workers=2) as ex:
        task = asyncio.ensure_future(ex.run(call("gil", hold_gil, str(marker), 120)))
        await wait_for(marker.exists, 20)
        victim = int(marker.read_text())
        await asyncio.sleep(0.2)  # in C now, holding the GIL
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 20)  # not the 120 s the worker is deaf for
        assert pids_gone([victim], 5)
        await wait_for(lambda: len(ex.worker_pids()) == 2 and victim not in ex.worker_pids(), 20)
        await n_workers(ex, 2)
        assert await ex.run(call("after", add, 2, 2)) == 4


@pytest.mark.parametrize("in_flight", [2, None], ids=["waits-in-parent", "queued-in-dask"])
async def test_cancelled_pending_state_never_starts(tmp_path: pathlib.Path,
                                                    in_flight: int | None) -> None:
    """With ``max_in_flight=2`` the third call waits in the parent; by default (several calls
    per thread in Dask) it is sent and waits on a worker behind a busy one. Cancelled, neither
    ever starts."""
    release, never = tmp_path / "release", tmp_path / "never"
    markers = [tmp_path / f"busy{i}" for i in range(2)]
    async with releasing(release, n_workers=2, max_in_flight=in_flight) as ex:
        busy = [asyncio.ensure_future(ex.run(call(f"busy{i}", spin_until, str(release),
                                                   str(markers[i])))) for i in range(2)]
        await wait_for(lambda: all(m.exists() for m in markers), 20)
        starts: list[str] = []
        pending = asyncio.ensure_future(ex.run(PreparedCall(
            "pending", "touch", touch, (str(never),), on_start=lambda: starts.append("x"))))
        async def in_dask() -> bool:
            return any("pending" in str(k) for ks in (await ex.client.processing()).values()
                       for k in ks)

        await asyncio.sleep(0.3)  # both threads are busy
        deadline = time.monotonic() + 10
        while in_flight is None and not await in_dask() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # a loaded machine: the scheduler hears of it later
        if in_flight == 2:  # it waits in the parent
            assert ex._slots.used == 2 and starts == [] and not await in_dask()
        else:  # sent: it waits in Dask
            assert ex._slots.used == 3 and starts == ["x"] and await in_dask()
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        release.touch()
        assert len(set(await asyncio.gather(*busy))) == 2
        # a call sent after the cancel runs; the cancelled one, had it been sent, before it
        assert await ex.run(call("later", touch, str(tmp_path / "later"))) == str(
            tmp_path / "later")
        assert not never.exists()
        assert ex.client is not None and len(ex.worker_pids()) == 2  # nobody was killed


async def test_future_cancelled_in_dask_is_asyncio_cancelled(tmp_path: pathlib.Path) -> None:
    release, marker = tmp_path / "release", tmp_path / "started"
    async with releasing(release, n_workers=1) as ex:
        task = asyncio.ensure_future(ex.run(call("victim", spin_until, str(release),
                                                  str(marker))))
        await wait_for(marker.exists, 20)
        [fut] = ex._in_flight
        await ex.client.cancel([fut], reason="someone else")
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_large_arguments_are_scattered_once_and_released() -> None:
    # 24 MB: sent inside the task graph it would raise distributed's "large graph" UserWarning
    data = np.arange(3_000_000, dtype=np.int64)
    ex = DaskExecutor(n_workers=2, max_in_flight=4)
    try:
        await ex.start()
        scattered: list[int] = []
        real_scatter = ex.client.scatter

        def counting_scatter(data: Any, **kwargs: Any) -> Any:
            scattered.append(len(data))
            return real_scatter(data, **kwargs)

        ex.client.scatter = counting_scatter
        results = await asyncio.gather(*(ex.run(call(f"sum{i}", checksum, data, scale=i))
                                         for i in range(4)))
        assert results == [int(data.sum()) * i for i in range(4)]
        assert scattered == [1]  # four calls at once, one copy sent
        assert len(ex._scatter) == 0
        deadline = time.monotonic() + 5
        while [k for k in await ex.client.scheduler.who_has() if "statepool-arg-" in str(k)]:
            assert time.monotonic() < deadline, "the scattered copy was not released"
            await asyncio.sleep(0.05)
    finally:
        await ex.shutdown(cancel=True)


async def test_manager_end_to_end_with_lazy_args_retries_and_timeout(
        tmp_path: pathlib.Path) -> None:
    # A crash fails at once (retries are ours); one call per thread in flight, so no innocent
    # state waits on the worker that the crash kills (with allowed_failures=0 it would fail too).
    ex = DaskExecutor(n_workers=2, allowed_failures=0, max_in_flight=2)
    release = tmp_path / "release"
    parent = os.getpid()
    try:
        async with StateManager(executors={"dask": ex}) as m:
            h_add = await m.put_state(State("add", add, True, executor="dask",
                                            lazy_args=(lambda: os.getpid(), 1)))
            h_coro = await m.put_state(State("coro", double_later, True, executor="dask",
                                             args=(5,)))
            h_slow = await m.put_state(State("slow", spin_until, True, executor="dask",
                                             args=(str(release),), timeout=0.5))
            h_crash = await m.put_state(State("crash", exit_process, True, executor="dask",
                                              retries=1))
            assert await h_add == parent + 1  # lazy args resolved in the parent
            assert (await h_coro)[1] == 10
            with pytest.raises(StateTimeoutError):
                await h_slow
            with pytest.raises(WorkerCrashedError, match="'crash'"):
                await h_crash
            assert h_crash.attempts == 2 and h_slow.status is StateStatus.FAILED
    finally:
        release.touch()
    assert ex.client is None and ex.worker_pids() == []


async def test_tls_through_security(tmp_path: pathlib.Path) -> None:
    from distributed import Security

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj",
                    "/CN=statepool-test", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=30)
    files = {"tls_ca_file": str(cert), "tls_client_cert": str(cert),
             "tls_client_key": str(key), "tls_scheduler_cert": str(cert),
             "tls_scheduler_key": str(key), "tls_worker_cert": str(cert),
             "tls_worker_key": str(key)}
    ex = DaskExecutor(n_workers=1, security=Security(require_encryption=True, **files))
    try:
        assert await ex.run(call("over-tls", add, 4, 5)) == 9
        assert ex.client.scheduler.address.startswith("tls://127.0.0.1:")
    finally:
        await ex.shutdown(cancel=True)


async def test_state_cancelled_while_the_cluster_starts_leaves_it_whole(
        pids_gone: Any) -> None:
    ex = DaskExecutor(n_workers=1)
    first = asyncio.ensure_future(ex.run(call("first", add, 1, 1)))
    await asyncio.sleep(0.05)  # the LocalCluster is starting
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    try:
        assert await ex.run(call("second", add, 2, 2)) == 4  # the same cluster, started once
        pids = ex.worker_pids()
        assert len(pids) == 1
    finally:
        await ex.shutdown(cancel=True)
    assert pids_gone(pids, 10)


async def test_shutdown_while_the_cluster_starts_closes_it() -> None:
    ex = DaskExecutor(n_workers=1)
    first = asyncio.ensure_future(ex.run(call("first", add, 1, 1)))
    await asyncio.sleep(0.05)
    await ex.shutdown(cancel=True)  # waits for the start, then closes what it started
    with pytest.raises(RuntimeError, match="shut down"):
        await first
    assert ex.worker_pids() == []  # and no_leaks checks that no process is left


# -- no cluster at all ------------------------------------------------------------------------


def test_lost_scheduler_is_a_crash_and_other_cancels_are_cancellations() -> None:
    from distributed.client import FutureCancelledError

    c = call("orphan", add, 1, 2)
    lost = translate_error(FutureCancelledError("k", reason="scheduler-connection-lost"), c)
    assert isinstance(lost, WorkerCrashedError) and lost.state_name == "orphan"
    other = translate_error(FutureCancelledError("k", reason="scheduler-restart"), c)
    assert isinstance(other, asyncio.CancelledError) and "scheduler-restart" in str(other)


def test_registry_builds_it_lazily_and_missing_extra_says_pip_install(
        monkeypatch: pytest.MonkeyPatch) -> None:
    ex = registry.create("dask")
    assert isinstance(ex, DaskExecutor) and ex.name == "dask" and ex.client is None
    with pytest.raises(ValueError, match=r"address.*n_workers"):
        DaskExecutor("tcp://127.0.0.1:1", n_workers=2)
    monkeypatch.delitem(sys.modules, "statepool.executors.dask.executor")
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'statepool\[dask\]'"):
        registry.create("dask")


# -- a cluster started apart: dask scheduler / dask worker -------------------------------------


async def test_external_cluster_runs_states_and_is_left_running(
        external_cluster: _ExternalCluster) -> None:
    ex = DaskExecutor(external_cluster.address)
    try:
        await ex.start()
        await n_workers(ex, 2, 30)
        assert ex.worker_pids() == []  # not ours
        assert len(external_cluster.pids()) >= 4  # scheduler, worker CLI, its two workers
        async with StateManager(executors={"dask": ex}) as m:
            handles = await m.put_states([State(f"s{i}", add, True, executor="dask",
                                                args=(i, i)) for i in range(6)])
            assert await asyncio.gather(*handles) == [2 * i for i in range(6)]
    finally:
        await ex.shutdown(cancel=True)
    assert all(p.poll() is None for p in external_cluster.procs)
    other = DaskExecutor(external_cluster.address)
    try:
        await other.start()
        await n_workers(other, 2, 30)
        assert await other.run(call("again", add, 1, 2)) == 3
    finally:
        await other.shutdown(cancel=True)


async def test_external_cluster_cancel_spares_workers_unless_asked(
        external_cluster: _ExternalCluster, tmp_path: pathlib.Path, pids_gone: Any) -> None:
    for kill in (False, True):
        marker, release = tmp_path / f"started-{kill}", tmp_path / f"release-{kill}"
        async with releasing(release, external_cluster.address,
                             kill_on_cancel=kill or None) as ex:
            await ex.start()
            await n_workers(ex, 2, 30)
            task = asyncio.ensure_future(ex.run(call(f"spin-{kill}", spin_until, str(release),
                                                      str(marker))))
            await wait_for(marker.exists, 20)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            victim = int(marker.read_text())
            if kill:
                assert pids_gone([victim], 5)
            else:  # Dask cannot stop a running task: it runs on, its result dropped
                assert psutil.pid_exists(victim)


async def test_manager_dependencies_on_dask() -> None:
    from statepool.engine import DependencyError

    ex = DaskExecutor(n_workers=1)
    async with StateManager(executors={"dask": ex}) as m:
        a = await m.put_state(State("a", add, True, executor="dask", args=(1, 2)))
        b = await m.put_state(State("b", add, True, executor="dask", args=(a, 10)))
        bad = await m.put_state(State("bad", add, True, executor="dask", args=("x", 1)))
        c = await m.put_state(State("c", add, True, executor="dask", lazy_args=(bad, 1)))
        assert await b == 13
        await m.join()
    err = c.exception()
    assert isinstance(err, DependencyError) and isinstance(err.__cause__, TypeError)


def stamp(path: str, name: str) -> str:
    """Appends ``name start end`` (monotonic, one clock per machine) to ``path``."""
    start = time.monotonic()
    time.sleep(0.05)
    with open(path, "a") as f:
        f.write(f"{name} {start!r} {time.monotonic()!r}\n")
    return name


async def test_manager_tags_and_priorities_on_dask(tmp_path: pathlib.Path) -> None:
    log = str(tmp_path / "log")
    ex = DaskExecutor(n_workers=2)
    async with StateManager(executors={"dask": ex}, limits={"one": 1}) as m:
        handles = await m.put_states([
            State(f"s{i}", stamp, True, executor="dask", args=(log, f"s{i}"), tags=("one",),
                  priority=i % 2) for i in range(4)])
        assert [await h for h in handles] == ["s0", "s1", "s2", "s3"]
    rows = [line.split() for line in pathlib.Path(log).read_text().splitlines()]
    spans = sorted((float(a), float(b)) for _, a, b in rows)
    assert all(end <= nxt for (_, end), (nxt, _) in itertools.pairwise(spans))
    assert [r[0] for r in rows] == ["s1", "s3", "s0", "s2"]  # priority 1 first, FIFO after


async def test_events_name_the_dask_worker_in_order() -> None:
    """Issue 13: a Dask state's events come in order and name the worker's address."""
    from statepool.engine import StateEvent

    events: list[StateEvent] = []
    async with StateManager(executors={"dask": DaskExecutor(n_workers=1)}) as m:
        m.add_listener(events.append)
        ok = await m.put_state(State("ok", add, True, args=(1, 2), executor="dask"))
        bad = await m.put_state(State("bad", raise_value_error, True, args=("no",),
                                      executor="dask", retries=1))
        assert await asyncio.wait_for(ok, 60) == 3
        with pytest.raises(ValueError):
            await asyncio.wait_for(bad, 60)
    kinds: dict[str, list[str]] = {}
    for event in events:
        kinds.setdefault(event.name, []).append(event.kind)
    assert kinds == {"ok": ["queued", "started", "succeeded"],
                     "bad": ["queued", "started", "retrying", "started", "failed"]}
    end = next(e for e in events if e.name == "ok" and e.kind == "succeeded")
    assert isinstance(end.worker, str) and "://" in end.worker  # the Dask worker's address
    assert ok.timings["running"] > 0.0


def odd_fails(x: int) -> int:
    if x % 2:
        raise ValueError(f"odd {x}")
    return x


async def test_manager_map_on_dask_chunks_with_per_item_errors() -> None:
    ex = DaskExecutor(n_workers=1)
    async with StateManager(executors={"dask": ex}) as m:
        got = [r async for r in m.map(odd_fails, range(3_000), executor="dask",
                                      return_exceptions=True)]
        states = sum(m.stats().by_status.values())
    assert got[::2] == list(range(0, 3_000, 2))
    assert all(isinstance(r, ValueError) for r in got[1::2])
    assert states < 300  # many items per Dask task
