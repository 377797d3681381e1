"""The benchmark suite: ``python -m benchmarks --quick`` end to end, and its harness.

The end-to-end run happens once per module in a subprocess; the tests read what it wrote (its
exit status, the JSON figures, the PNG charts) and look for any process it left behind.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest

from benchmarks.cases import EXECUTORS
from benchmarks.harness import SUITES, Case, Config, Figure, percentile, templates
from benchmarks.report import link_baselines
from benchmarks.runner import run_case
from benchmarks.suite_calls import dispatch_cases

pytestmark = pytest.mark.timeout(200)

ROOT = Path(__file__).resolve().parent.parent
RUN_TIMEOUT_S = 150
CHARTS = ("dispatch.png", "latency.png", "cpu_scaling.png", "payload.png")
MARK = "STATEPOOL_BENCH_TEST_MARK"


def _marked(token: str) -> list[psutil.Process]:
    """Processes whose environment carries ``token``: the run's descendants, even orphaned."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARK) == token and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench")
    token = uuid.uuid4().hex
    env = {**os.environ, MARK: token}
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks", "--quick", "--json", str(out / "figures.json"),
         "--plot", str(out / "charts")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        for child in _marked(token):
            child.kill()
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"--quick took more than {RUN_TIMEOUT_S} s:\n{stdout[-3000:]}\n"
                    f"{stderr[-3000:]}")
    deadline = time.monotonic() + 10
    while _marked(token) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [(p.pid, " ".join(p.cmdline())[:120]) for p in _marked(token)]
    for child in _marked(token):
        child.kill()
    return {"rc": proc.returncode, "stdout": stdout, "stderr": stderr, "dir": out,
            "pid": proc.pid, "left": left}


@pytest.fixture(scope="module")
def doc(quick_run: dict[str, Any]) -> dict[str, Any]:
    path = quick_run["dir"] / "figures.json"
    assert path.exists(), f"no JSON written; stderr:\n{quick_run['stderr'][-3000:]}"
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def test_quick_run_exits_zero_and_prints_every_suite(quick_run: dict[str, Any]) -> None:
    assert quick_run["rc"] == 0, (
        f"exit status {quick_run['rc']}\n{quick_run['stdout'][-4000:]}\n"
        f"{quick_run['stderr'][-4000:]}")
    for suite in SUITES:
        assert suite in quick_run["stdout"]
    assert "noise: other processes used" in quick_run["stdout"]
    assert "usable cores" in quick_run["stdout"]
    # a clean run prints no traceback (a library's resource tracker complaining at exit, an
    # error logged by a pool) on its way
    assert "Traceback" not in quick_run["stderr"], quick_run["stderr"][-4000:]


def test_quick_run_leaves_no_process_and_no_shared_memory(quick_run: dict[str, Any]) -> None:
    assert quick_run["left"] == []
    pid = str(quick_run["pid"])
    deadline = time.monotonic() + 5
    while True:
        ours = [n for n in os.listdir("/dev/shm") if pid in n.replace("-", "_").split("_")]
        if not ours or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert ours == []


def test_json_describes_machine_sections_and_cleanup(doc: dict[str, Any]) -> None:
    assert doc["schema"] == 1
    assert doc["config"]["quick"] is True
    assert doc["config"]["suites"] == list(SUITES)
    machine = doc["machine"]
    assert machine["usable_cores"] >= 1 and machine["python"].startswith("CPython")
    assert machine["libraries"]["loky"] and machine["libraries"]["numpy"]
    for suite in SUITES:
        noise = doc["sections"][suite]["noise"]
        assert 0 <= noise["others_pct"] <= 100 and noise["wall_s"] > 0
    cleanup = doc["cleanup"]
    assert cleanup["children_left"] == [] and cleanup["shm_left"] == []
    assert all(n.startswith("joblib_memmapping_folder_") for n in cleanup["shm_removed_at_exit"])


def test_every_figure_has_its_repetitions_median_and_ratio(doc: dict[str, Any]) -> None:
    reps = doc["config"]["repetitions"]
    by_name = {fig["name"]: fig for fig in doc["figures"]}
    assert len(by_name) == len(doc["figures"]), "figure names are not unique"
    for fig in doc["figures"]:
        assert fig["name"] == f"{fig['suite']}/{fig['metric']}/{fig['subject']}"
        assert isinstance(fig["unit"], str) and fig["unit"]
        assert fig["error"] is None, f"{fig['name']}: {fig['error']}"
        if fig["skipped"]:
            assert fig["repetitions"] == [] and fig["median"] is None
            continue
        values = fig["repetitions"]
        assert len(values) == reps and all(math.isfinite(v) for v in values), fig["name"]
        assert fig["median"] == pytest.approx(statistics.median(values))
        if fig["baseline"] is not None:
            base = by_name[fig["baseline"]]
            assert base["suite"] == fig["suite"] and base["unit"] == fig["unit"]
            if base["median"]:
                assert fig["ratio"] == pytest.approx(fig["median"] / base["median"])


def test_every_suite_measures_a_baseline_and_statepool(doc: dict[str, Any]) -> None:
    for suite in SUITES:
        figs = [f for f in doc["figures"] if f["suite"] == suite]
        assert any(f["kind"] == "baseline" and f["median"] for f in figs), suite
        assert any(f["kind"] == "statepool" for f in figs), suite


def test_every_executor_has_a_dispatch_row_measured_or_skipped(doc: dict[str, Any]) -> None:
    rows = {f["subject"]: f for f in doc["figures"] if f["suite"] == "dispatch"}
    assert {"asyncio gather(create_task)", "ThreadPoolExecutor", "ProcessPoolExecutor",
            "loky (direct)", "aiomultiprocess apply", "joblib.Parallel (sync)"} <= set(rows)
    for name in EXECUTORS:
        if name == "dask" and doc["machine"]["libraries"]["distributed"] is None:
            assert f"statepool {name}" not in rows
            continue
        row = rows[f"statepool {name}"]
        assert row["median"] or row["skipped"].startswith("executor not available")
    # the engine and its in-process executors exist: these rows must be measured
    assert rows["statepool inline"]["median"] > 0 and rows["statepool thread"]["median"] > 0


def test_cpu_speedups_are_plausible(doc: dict[str, Any]) -> None:
    """A speedup far past the worker count would be a broken measurement (noise can push a
    figure somewhat past it: the serial run shares the machine with other processes)."""
    figs = {f["subject"]: f for f in doc["figures"]
            if f["suite"] == "cpu" and f["metric"] == "speedup" and f["median"]}
    assert "ThreadPoolExecutor" in figs and "loky (direct)" in figs
    workers = doc["config"]["workers"]
    for subject, fig in figs.items():
        assert 0 < fig["median"] < workers * 3, subject
        eff = next(f for f in doc["figures"] if f["suite"] == "cpu"
                   and f["metric"] == "efficiency" and f["subject"] == subject)
        assert eff["median"] == pytest.approx(100 * fig["median"] / workers)


def test_charts_are_valid_png_files(quick_run: dict[str, Any]) -> None:
    from PIL import Image

    for name in CHARTS:
        path = quick_run["dir"] / "charts" / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        with Image.open(path) as img:
            img.verify()
            assert img.size[0] > 300 and img.size[1] > 100


def test_the_events_suite_writes_the_pipeline_trace_and_timeline(
        quick_run: dict[str, Any]) -> None:
    from PIL import Image

    charts = quick_run["dir"] / "charts"
    doc = json.loads((charts / "pipeline_trace.json").read_text())
    slices = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    outcomes = {e["args"]["outcome"] for e in slices if "outcome" in e["args"]}
    assert {"succeeded", "failed", "retrying"} <= outcomes
    with Image.open(charts / "pipeline_timeline.png") as img:
        img.verify()
        assert img.size[0] > 800


# -- the harness, in process --------------------------------------------------------------


def test_percentile_is_nearest_rank() -> None:
    samples = [float(i) for i in range(1, 101)]
    assert percentile(samples, 50) == 50.0
    assert percentile(samples, 99) == 99.0
    assert percentile([3.0, 1.0, 2.0], 99) == 3.0


def test_ratio_is_median_over_baseline_median() -> None:
    base = templates("s", "base", "baseline", None, [("m", "calls/s", True)])[0]
    mine = templates("s", "mine", "statepool", "base", [("m", "calls/s", True)])[0]
    lost = templates("s", "lost", "statepool", "nothing", [("m", "calls/s", True)])[0]
    base.repetitions, mine.repetitions, lost.repetitions = [1, 2, 4], [3, 1, 1], [5]
    link_baselines([base, mine, lost])
    assert mine.ratio == pytest.approx(0.5)
    assert base.ratio is None and lost.ratio is None


def test_unavailable_executor_row_is_skipped_with_reason(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import benchmarks.cases

    def missing(name: str, workers: int) -> Any:
        raise NotImplementedError(f"{name} lands later")

    monkeypatch.setattr(benchmarks.cases, "make_executor", missing)
    cfg = Config(quick=True, workers=1, repetitions=1, suites=("dispatch",))
    case = next(c for c in dispatch_cases(cfg) if c.subject == "statepool inline")
    run_case(case, cfg)
    fig = case.figures[0]
    assert fig.skipped == "executor not available: NotImplementedError: inline lands later"
    assert fig.repetitions == [] and fig.error is None


def test_failing_case_is_marked_with_its_error() -> None:
    async def boom(figs: list[Figure]) -> None:
        raise RuntimeError("worker exploded")

    figs = templates("s", "x", "statepool", None, [("m", "ms", False)])
    run_case(Case("s", "x", figs, boom), Config(repetitions=1))
    assert figs[0].error == "RuntimeError: worker exploded"
    assert "worker exploded" in figs[0].params["traceback"]


async def test_placement_check_fails_a_backend_that_runs_calls_in_the_wrong_place() -> None:
    from benchmarks.baselines import Serial

    here = Serial(2)
    await here.check_placement()  # this process, as it says
    here.remote = True
    with pytest.raises(RuntimeError, match="expected other processes"):
        await here.check_placement()


def test_section_noise_weights_each_span_by_its_length() -> None:
    from benchmarks.noise import Noise

    both = Noise.combine([Noise(1.0, 10.0, 50.0), Noise(3.0, 50.0, 30.0)])
    assert both.wall_s == 4.0
    assert both.others_pct == pytest.approx(40.0) and both.ours_pct == pytest.approx(35.0)
