"""The benchmark scripts at their smallest sizes: what they record, and how they fail (never their timings)."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO_ROOT

BENCHMARKS = REPO_ROOT / "benchmarks"


def run_script(script: str, *args: str, cwd, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_train_step_reports_failed_configurations_and_still_writes_the_others(tmp_path):
    # A configuration that fails (here: no such preset; on a GPU: out of memory) used to end the run with a
    # RuntimeError and no JSON, losing every row measured before it.
    output = tmp_path / "rows.json"
    result = run_script("train_step.py", "--preset", "no_such_preset", "--crop-size", "64", "--steps", "1",
                        "--losses", "rmi", "cross_entropy", "--threads", "1", "--output", str(output), cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "RuntimeError" not in result.stderr
    rows = json.loads(output.read_text())["rows"]
    assert [row["loss"] for row in rows] == ["rmi", "cross_entropy"]
    assert all("no_such_preset" in row["error"] for row in rows)
    assert result.stdout.count("failed: ") == 4  # as each fails, and in the table


@pytest.mark.parametrize("script, args", [
    ("blur.py", ["--size", "32", "--repeats", "1"]),
    ("data_pipeline.py", ["--num-frames", "2", "--height", "64", "--width", "128", "--crop-size", "32",
                          "--repeats", "1", "--num-workers", "0"]),
])
def test_benchmark_without_output_leaves_the_working_folder_alone(tmp_path, script, args):
    # blur.py and data_pipeline.py wrote blur.json / data_pipeline.json into the working folder on every run
    result = run_script(script, *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "pass --output" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_onnxruntime_row_answers_only_once_its_threads_stopped_spinning(monkeypatch):
    # onnxruntime's intra-op threads spin for about 20 ms after a run; in interleaved rounds the next row's timed call
    # started at once and shared the cores with them. The row now waits, untimed, before it answers.
    pytest.importorskip("onnxruntime")
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # also for the spawned row process, which imports it again
    import inference
    spec = {"preset": "mobilenetv2_deeplabv3plus", "height": 64, "width": 128, "scales": [1.0], "precision": "fp32",
            "variant": "onnxruntime", "device": "cpu", "threads": 1}
    context = multiprocessing.get_context("spawn")
    parent_end, child_end = context.Pipe()
    process = context.Process(target=inference._row_worker, args=(spec, child_end))
    process.start()
    child_end.close()
    try:
        assert parent_end.poll(300)
        assert parent_end.recv().get("ready"), "the row failed to start"
        for _ in range(2):
            start = time.perf_counter()
            parent_end.send("run")
            answer = parent_end.recv()
            waited = time.perf_counter() - start
            assert waited - answer["total_s"] >= 0.05  # the spin lasts 20-30 ms
            assert answer["total_s"] < waited  # the pause is not part of the row's latency
        parent_end.send("finish")
        assert "peak_mib" in parent_end.recv()
    finally:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()


def test_gpu_checks_resolves_output_dir_from_the_callers_folder_and_keeps_to_its_budget(tmp_path):
    # OUTPUT_DIR was read after the script's cd into the repository, so a relative one landed in the checkout; the
    # steps' own limits added up to 19 minutes, past a lent machine's 10-minute command limit.
    name = f"gpu_checks_test_{os.getpid()}"
    caller = tmp_path / "caller"
    caller.mkdir()
    result = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_checks.sh"), name, "--smoke"], cwd=caller, capture_output=True, text=True,
        timeout=120, env={**os.environ, "PYTHON": sys.executable, "GPU_CHECKS_BUDGET_S": "1",
                          "GPU_CHECKS_WORK_DIR": str(tmp_path / "work")},
    )
    misplaced = REPO_ROOT / name
    if misplaced.exists():  # the old behaviour: clean up the checkout before failing
        subprocess.run(["rm", "-rf", str(misplaced)], check=False)
        pytest.fail(f"gpu_checks.sh wrote into the checkout: {misplaced}")
    assert result.returncode == 1
    log = (caller / name / "gpu_checks.log").read_text()
    assert log == result.stdout
    assert log.count("=== skipped") == 8 and "=== at " not in log  # every step, none started past the budget
    assert sorted(path.name for path in (caller / name).iterdir()) == ["gpu_checks.log"]
