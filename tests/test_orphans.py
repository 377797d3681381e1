"""Nothing is orphaned: workers die with their parent, and stop kills what states left behind.

SPEC (executors): process workers ("process", "aioprocess") never outlive the parent: when it
dies, even by SIGKILL, they exit within about a second, with the processes they started. At
stop, processes a state left behind (children, daemonized grandchildren) are killed, and
``process_states()`` returns within ``shutdown_grace`` plus a few seconds whatever they do. A
dead parent's temporary directory is removed by the next executor.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import _attacks
import psutil
import pytest

from statepool.engine import State, StateManager, StateStatus
from statepool.engine.errors import WorkerCrashedError
from statepool.executors import AioProcessExecutor, LokyExecutor
from statepool.executors._wire import lifeline
from statepool.executors.process.executor import TEMP_PREFIX

TESTS = Path(__file__).resolve().parent
DEADLINE_S = 30.0
GONE_S = 3.0  # "about a second", with room for a loaded CI machine


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        left = [pid for pid in pids if alive(pid)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.02)


def read_pid(path: Path, timeout: float = DEADLINE_S) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return int(path.read_text())
        except (FileNotFoundError, ValueError):
            time.sleep(0.01)
    raise AssertionError(f"no PID in {path}")


PARENT = textwrap.dedent("""
    import asyncio, os, sys
    sys.path.insert(0, {tests!r})
    import _attacks
    from statepool.engine import State, StateManager
    from statepool.executors import AioProcessExecutor, LokyExecutor

    out = sys.argv[1]

    async def main():
        process, aio = LokyExecutor(3), AioProcessExecutor(1, 4)
        m = StateManager(executors={{"process": process, "aioprocess": aio}})
        task = asyncio.ensure_future(m.process_states())
        put = lambda *a, **k: m.put_state(State(*a, **k))
        await put("spin", _attacks.spin_forever, True, executor="process")
        await put("popen", _attacks.popen_then_sleep, True, args=(out + ".popen",),
                  executor="process")
        await put("daemon", _attacks.daemonize_then_sleep, True, args=(out + ".daemon",),
                  executor="process")
        await put("aio-popen", _attacks.popen_then_sleep_async, True,
                  args=(out + ".apopen",), executor="aioprocess")
        await put("aio-spin", _attacks.spin_forever_async, True, executor="aioprocess")
        while not all(os.path.exists(out + s) for s in (".popen", ".daemon", ".apopen")):
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # the spinners spin
        await _attacks.publish_and_wait(out, {{"workers": process.worker_pids()
                                               + aio.worker_pids(), "dir": process._dir}})

    if __name__ == "__main__":
        asyncio.run(main())
""")


# Loaded by every interpreter of the test (PYTHONPATH): no parent-death signal, so only the
# portable watch (end of file on the parent's anchor) is left; each process notes its PID.
NO_PDEATHSIG = textwrap.dedent("""
    import os
    from statepool.executors._wire import lifeline

    lifeline._PR_SET_PDEATHSIG = -1  # prctl refuses it: no parent-death signal
    with open({marks!r}, "a") as f:
        f.write(f"{{os.getpid()}}\\n")
""")


@pytest.mark.parametrize(("sig", "pdeathsig"), [(signal.SIGKILL, True), (signal.SIGTERM, True),
                                                (signal.SIGKILL, False)],
                         ids=["SIGKILL", "SIGTERM", "SIGKILL-no-pdeathsig"])
def test_workers_die_with_their_parent_and_take_what_they_started(
        tmp_path: Path, sig: int, pdeathsig: bool) -> None:
    out = tmp_path / "info"
    script = tmp_path / "parent.py"
    script.write_text(PARENT.format(tests=str(TESTS)))
    env = dict(os.environ)
    marks = tmp_path / "no-pdeathsig"
    if not pdeathsig:
        (tmp_path / "site").mkdir()
        (tmp_path / "site" / "sitecustomize.py").write_text(
            NO_PDEATHSIG.format(marks=str(marks)))
        env["PYTHONPATH"] = os.pathsep.join(
            [str(tmp_path / "site"), *filter(None, [env.get("PYTHONPATH")])])
    parent = subprocess.Popen([sys.executable, str(script), str(out)], env=env)
    try:
        deadline = time.monotonic() + DEADLINE_S
        while not out.exists():
            assert parent.poll() is None, "the parent script died"
            assert time.monotonic() < deadline, "the parent script did not get ready"
            time.sleep(0.02)
        info = json.loads(out.read_text())
        started = [read_pid(Path(f"{out}{suffix}")) for suffix in (".popen", ".daemon",
                                                                   ".apopen")]
        victims = info["workers"] + started
        assert len(info["workers"]) == 4 and all(alive(pid) for pid in victims)
        if not pdeathsig:  # every worker ran without a parent-death signal
            assert set(info["workers"]) <= {int(x) for x in marks.read_text().split()}
        parent.send_signal(sig)
        parent.wait(10)
        began = time.monotonic()
        left = wait_gone(victims, GONE_S)
        assert not left, f"outlived their parent by {GONE_S} s: {left}"
        assert time.monotonic() - began < GONE_S
        # the dead parent's temporary directory is left; the next executor removes it
        assert os.path.isdir(info["dir"])
        assert info["dir"] in lifeline.sweep(TEMP_PREFIX)
        assert not os.path.exists(info["dir"])
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for suffix in (".popen", ".daemon", ".apopen"):
            path = Path(f"{out}{suffix}")
            if path.exists():
                with __import__("contextlib").suppress(ProcessLookupError, ValueError):
                    os.kill(int(path.read_text()), signal.SIGKILL)


WATCHER = textwrap.dedent("""
    import socket, sys, time
    from statepool.executors._wire import lifeline

    end = socket.socket(fileno=int(sys.argv[1]))
    lifeline.arm(int(sys.argv[2]), pdeathsig=False, watch=end)
    print("armed", flush=True)
    time.sleep(60)
""")


def test_a_worker_dies_at_end_of_file_on_its_parents_anchor() -> None:
    """The portable watch: no parent-death signal, the parent still alive (its PID unchanged)
    but its end of the anchor closed, as the kernel does when it dies: the worker exits."""
    import socket

    ours, theirs = socket.socketpair()
    child = subprocess.Popen([sys.executable, "-c", WATCHER, str(theirs.fileno()),
                              str(os.getpid())], stdout=subprocess.PIPE, text=True,
                             pass_fds=[theirs.fileno()])
    try:
        theirs.close()
        assert child.stdout is not None and child.stdout.readline() == "armed\n"
        time.sleep(0.3)
        assert child.poll() is None  # the anchor is open: it lives
        ours.close()
        began = time.monotonic()
        assert child.wait(GONE_S) == 70  # lifeline's exit code: its parent is gone
        assert time.monotonic() - began < 1.0
    finally:
        ours.close()
        if child.poll() is None:
            child.kill()
        child.wait()
        assert child.stdout is not None
        child.stdout.close()


FORKER = textwrap.dedent("""
    import os
    from statepool.executors._wire import lifeline

    end = lifeline.anchor()
    ours = lifeline._anchor[0].fileno()  # the parent's end, by number
    pid = os.fork()
    if pid == 0:
        try:
            os.fstat(ours)
            print("open", flush=True)
        except OSError:
            os.fstat(end.fileno())  # the workers' end stays (a forked worker watches it)
            print("closed", flush=True)
        os._exit(0)
    os.waitpid(pid, 0)
    os.fstat(ours)  # and in the parent, its end stays open
""")


def test_the_anchor_is_closed_in_a_process_forked_from_the_parent() -> None:
    """A forked copy of the parent's end would keep the workers' end from end of file."""
    done = subprocess.run([sys.executable, "-c", FORKER], capture_output=True, text=True,
                          timeout=DEADLINE_S)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "closed\n"


async def test_the_next_executor_removes_a_dead_parents_directory(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = Path(os.environ.get("TMPDIR", "/tmp")) / f"{TEMP_PREFIX}{dead.pid}-stale"
    stale.mkdir(exist_ok=True)
    (stale / "slots").write_bytes(b"x")
    os.utime(stale, (time.time() + 5, time.time() + 5))  # not a PID reused since
    ours = Path(os.environ.get("TMPDIR", "/tmp")) / f"{TEMP_PREFIX}{os.getpid()}-alive"
    ours.mkdir(exist_ok=True)
    ex = LokyExecutor(1)
    try:
        await ex.start()
        assert not stale.exists()
        assert ours.exists()  # a live parent's directory stays
    finally:
        await ex.shutdown(cancel=True)
        ours.rmdir()


@pytest.mark.parametrize("executor", ["process", "aioprocess"])
@pytest.mark.parametrize("what", ["popen", "daemon"])
async def test_stop_kills_what_states_left_behind_and_is_bounded(
        tmp_path: Path, executor: str, what: str) -> None:
    path = str(tmp_path / "pid")
    aio = executor == "aioprocess"
    fn: Any = {("popen", False): _attacks.popen_then_sleep,
               ("popen", True): _attacks.popen_then_sleep_async,
               ("daemon", False): _attacks.daemonize_then_sleep,
               ("daemon", True): _attacks.daemonize_then_sleep_async}[what, aio]
    ex = AioProcessExecutor(1, 2) if aio else LokyExecutor(1)
    m = StateManager(executors={executor: ex}, shutdown_grace=0.5)
    main = asyncio.ensure_future(m.process_states())
    handle = await m.put_state(State("leaver", fn, True, args=(path,), executor=executor))
    deadline = time.monotonic() + DEADLINE_S
    while not os.path.exists(path):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    left = int(Path(path).read_text())
    began = time.monotonic()
    m.signal_stopping()
    await asyncio.wait_for(main, 0.5 + 6.0)
    assert time.monotonic() - began < 6.5
    assert handle.status is StateStatus.CANCELLED
    assert not await asyncio.to_thread(wait_gone, [left], GONE_S), "left behind after stop"


@pytest.mark.parametrize("executor", ["process", "aioprocess"])
async def test_a_worker_that_dies_while_a_daemon_holds_its_socket_fails_its_state(
        tmp_path: Path, executor: str) -> None:
    """Its socket (and sentinel) stay open in the daemon: the exit code tells the death."""
    path = str(tmp_path / "pid")
    aio = executor == "aioprocess"
    ex = AioProcessExecutor(1, 2) if aio else LokyExecutor(1)
    fn = _attacks.daemonize_then_exit_async if aio else _attacks.daemonize_then_exit
    try:
        async with StateManager(executors={executor: ex}) as m:
            handle = await m.put_state(State("dies", fn, True, args=(path,), executor=executor))
            with pytest.raises(WorkerCrashedError, match="'dies'"):
                await asyncio.wait_for(handle, DEADLINE_S)
            follow = State("after", _attacks.answer_async if aio else _attacks.answer, True,
                           args=(5,), executor=executor)
            assert await asyncio.wait_for(await m.put_state(follow), DEADLINE_S) == 5
    finally:
        if os.path.exists(path):
            with __import__("contextlib").suppress(ProcessLookupError):
                os.kill(int(Path(path).read_text()), signal.SIGKILL)


# -- hangs of the process executor -----------------------------------------------------------


async def test_a_worker_that_cannot_start_once_is_tried_again(monkeypatch: Any) -> None:
    """EMFILE, EAGAIN or ENOMEM at spawn: the calls waiting must not hang until another state
    arrives."""
    import errno

    from statepool.executors.process.pool import Worker

    real = Worker.spawn.__func__  # type: ignore[attr-defined]
    tries: list[int] = []

    def flaky(cls: Any, *args: Any, **kwargs: Any) -> Any:
        tries.append(1)
        if len(tries) == 1:
            raise OSError(errno.EMFILE, "Too many open files")
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(Worker, "spawn", classmethod(flaky))
    async with StateManager(executors={"process": LokyExecutor(1)}) as m:
        handle = await m.put_state(State("waits", _attacks.answer, True, args=(3,),
                                         executor="process"))
        assert await asyncio.wait_for(handle, DEADLINE_S) == 3
    assert len(tries) >= 2


async def test_crashed_handles_kept_by_the_caller_hold_no_descriptor() -> None:
    """Each kept crash used to hold its dead worker (a pipe and a 256 KiB buffer)."""
    import gc

    def fds() -> int:
        return len(os.listdir(f"/proc/{os.getpid()}/fd"))

    if not os.path.isdir(f"/proc/{os.getpid()}/fd"):
        pytest.skip("no /proc here to count descriptors")
    kept = []
    async with StateManager(executors={"process": LokyExecutor(1)}) as m:
        for i in range(12):
            handle = await m.put_state(State(f"c{i}", _attacks.raise_kind, True,
                                             args=("os_exit",), executor="process"))
            with pytest.raises(WorkerCrashedError):
                await asyncio.wait_for(handle, DEADLINE_S)
            kept.append(handle)
            if i == 1:
                gc.collect()
                before = fds()
        deadline = time.monotonic() + 10  # the last dead workers are reaped, new ones ready
        while True:
            gc.collect()
            after = fds()
            if after - before <= 2 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
    assert after - before <= 2, f"{after - before} descriptors for 10 kept crashes"


async def test_a_result_computed_before_the_worker_dies_releasing_its_arguments_is_kept() -> None:
    async with StateManager(executors={"process": LokyExecutor(1)}) as m:
        handle = await m.put_state(State("kept", _attacks.answer_holding, True,
                                         args=(11, _attacks.ExitsOnDel()), executor="process"))
        assert await asyncio.wait_for(handle, DEADLINE_S) == 11
        after = await m.put_state(State("after", _attacks.answer, True, args=(1,),
                                        executor="process"))
        assert await asyncio.wait_for(after, DEADLINE_S) == 1


def test_aioprocess_says_once_why_its_children_cannot_start(tmp_path: Path) -> None:
    """A script read from stdin under the spawn start method: each child would die printing a
    traceback, and the error said only "exited with code 1 (IncompleteReadError)"."""
    script = textwrap.dedent("""
        import asyncio
        from statepool.engine import State, StateManager

        async def f(x):
            return x

        async def main():
            async with StateManager() as m:
                hs = [await m.put_state(State(f"s{i}", f, True, args=(i,),
                                              executor="aioprocess")) for i in range(6)]
                for h in hs:
                    try:
                        await h
                    except Exception as e:
                        print("ERR", e)

        asyncio.run(main())
    """)
    done = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    errors = [line for line in done.stdout.splitlines() if line.startswith("ERR")]
    assert len(errors) == 6 and all("'<stdin>'" in e and "not a file" in e for e in errors)
    assert "spawn_main" not in done.stderr  # no child started, none printed its traceback


# -- Dask: the LocalCluster statepool starts -------------------------------------------------

DASK_PARENT = textwrap.dedent("""
    import asyncio, os, sys
    sys.path.insert(0, {tests!r})
    import _attacks
    from statepool.engine import State, StateManager
    from statepool.executors import DaskExecutor

    out = sys.argv[1]

    async def main():
        ex = DaskExecutor(n_workers=1)
        async with StateManager(executors={{"dask": ex}}) as m:
            await m.put_state(State("popen", _attacks.popen_then_sleep, True,
                                    args=(out + ".popen",), executor="dask"))
            while not os.path.exists(out + ".popen"):
                await asyncio.sleep(0.01)
            await _attacks.publish_and_wait(out, {{"workers": ex.worker_pids(),
                                                   "address": ex.client.scheduler.address}})

    if __name__ == "__main__":
        asyncio.run(main())
""")


def test_dask_workers_statepool_started_die_with_the_parent_and_speak_tls(
        tmp_path: Path) -> None:
    pytest.importorskip("distributed")
    pytest.importorskip("cryptography")
    out = tmp_path / "info"
    script = tmp_path / "parent.py"
    script.write_text(DASK_PARENT.format(tests=str(TESTS)))
    parent = subprocess.Popen([sys.executable, str(script), str(out)],
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not out.exists():
            assert parent.poll() is None, "the parent script died"
            assert time.monotonic() < deadline, "the parent script did not get ready"
            time.sleep(0.05)
        info = json.loads(out.read_text())
        assert info["address"].startswith("tls://")  # not plain TCP: other local users
        victims = info["workers"] + [read_pid(Path(f"{out}.popen"))]
        assert len(info["workers"]) == 1 and all(alive(pid) for pid in victims)
        parent.kill()
        parent.wait(10)
        left = wait_gone(victims, GONE_S)
        assert not left, f"outlived their parent by {GONE_S} s: {left} of {victims}"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        path = Path(f"{out}.popen")
        if path.exists():
            with __import__("contextlib").suppress(ProcessLookupError, ValueError):
                os.kill(int(path.read_text()), signal.SIGKILL)


async def test_a_state_that_changes_its_worker_changes_it_for_later_states_unless_recycled(
        ) -> None:
    """The rule docs/process.md states: nothing is restored between calls;
    ``max_tasks_per_worker=1`` gives every call a fresh worker."""
    import resource

    limit = 4 << 30
    for recycle, changed in ((None, True), (1, False)):
        ex = LokyExecutor(1, max_tasks_per_worker=recycle)
        async with StateManager(executors={"process": ex}) as m:
            first = await asyncio.wait_for(await m.put_state(State(
                "lower", _attacks.lower_rlimit_as, True, args=(limit,), executor="process")),
                DEADLINE_S)
            pid, soft = await asyncio.wait_for(await m.put_state(State(
                "later", _attacks.rlimit_as, True, executor="process")), DEADLINE_S)
        assert (pid == first) is changed
        assert (soft == limit) is changed
        if not changed:
            assert soft == resource.getrlimit(resource.RLIMIT_AS)[0]
