"""Real SLURM: launch/slurm/dapo.sbatch on the toy run, preempted mid-run with USR1, saves at the signal, requeues,
resumes from `latest` and ends with the metrics (and TensorBoard scalars) of an uninterrupted run.

Needs a running one-host cluster (`tools/slurm_local.sh start`, done by .ci/run as root); skipped otherwise.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_trainer import _args, _metrics, _train, toy  # noqa: F401 (toy is a fixture)

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "launch" / "slurm" / "dapo.sbatch"
STEPS = 4
pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(1800)]


def _slurm_up():
    if shutil.which("sbatch") is None:
        pytest.skip("slurm is not installed (as root: tools/slurm_local.sh start)")
    probe = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0 or not re.search(r"idle|mix|alloc", probe.stdout):
        pytest.skip(f"no slurm controller with an idle node (tools/slurm_local.sh start): {probe.stderr.strip()}")


def _job(job_id: str) -> dict:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=30).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def _wait(what: str, cond, timeout_s: float, log: Path):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(1)
    tail = log.read_text()[-6000:] if log.is_file() else "(no job log)"
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}; job log:\n{tail}")


def _rows(run_dir: Path) -> list:
    f = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.is_file() else []


def test_sbatch_preempted_by_usr1_saves_requeues_and_resumes_exactly(toy, tmp_path):  # noqa: F811
    _slurm_up()
    straight, config = tmp_path / "straight", str(REPO / "examples" / "toy" / "config.yaml")
    _train(["--config", config, *_args(toy, straight, steps=STEPS, extra=["trainer.save_interval=0"])])

    run, job_log = tmp_path / "slurm_run", tmp_path / "job.out"
    args = _args(toy, run, steps=STEPS, extra=["trainer.save_interval=0", "trainer.tensorboard=true"])
    # The trainer holds after step 1 until the signal arrives (faults.py): however fast the steps run, the signal
    # lands mid-run, and the save at the signal is iter_0000001.
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "RUN_DIR": str(run), "CKPT": str(run / "checkpoints"), "DAPO_FAULT": "hold_for_signal@1"}
    submit = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
         f"--job-name=dapo_test_{os.getpid()}", f"--chdir={tmp_path}", f"--output={job_log}", "--export=ALL",
         str(SBATCH), config, *args],
        capture_output=True, text=True, timeout=60, env=env)
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.strip().split(";")[0]
    try:
        _wait("the first step's metrics", lambda: len(_rows(run)) >= 1, 600, job_log)
        signalled = subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], capture_output=True, text=True)
        assert signalled.returncode == 0, signalled.stderr
        _wait("the requeue", lambda: "requeueing" in job_log.read_text(), 600, job_log)
        _wait("the requeued job to finish", lambda: _job(job_id).get("JobState") == "COMPLETED"
              and int(_job(job_id).get("Restarts", 0)) >= 1, 900, job_log)
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
    text = job_log.read_text()
    trainer_log = "".join(f.read_text() for f in sorted((tmp_path / "logs").glob("*-node*.out")))
    assert re.search(r"^rollout \d+: kept \d+/4 groups, round \d+, acc ", trainer_log, re.M)  # non-TTY progress
    assert "died" not in trainer_log  # the signal reached the trainer, not its helper processes
    saved = re.search(r"preempted: checkpoint saved at step (\d+)", trainer_log)
    assert saved and "trainer exited with 75" in text, (text + trainer_log)[-4000:]
    k = int(saved.group(1))
    assert k == 1  # saved at the signal, after the held step 1: save_interval=0 would only save at the end
    assert (run / "checkpoints" / f"iter_{k:07d}" / "trainer_state.json").is_file()
    assert re.search(r"restart 1 resume trainer\.load=", text), text[-4000:]  # the requeued start resumed
    assert (run / "checkpoints" / "latest").read_text().strip() == f"iter_{STEPS:07d}"
    a, b = _metrics(straight), _metrics(run)
    diffs = [(x["step"], key, x.get(key), y.get(key)) for x, y in zip(a, b) for key in x.keys() | y.keys()
             if x.get(key) != y.get(key)]
    assert len(a) == len(b) == STEPS and not diffs

    # TensorBoard after the resume: every logged scalar at every step, once, equal to metrics.jsonl.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    rows = _rows(run)
    for key in {k for r in rows for k in r if k not in ("step", "time")}:
        events = acc.Scalars(key)
        steps = [e.step for e in events]
        assert steps == sorted(set(steps)), (key, steps)  # no duplicated or replayed steps
        want = {r["step"]: r[key] for r in rows if key in r}
        assert {e.step: pytest.approx(e.value, rel=1e-6, abs=1e-6) for e in events} == want, key
