"""W&B and MLflow (train/trackers.py) read back by their own readers: MlflowClient.get_metric_history and W&B's
offline-run reader (`wandb leet inspect --json`), for a plain run, a killed-and-resumed one, and a tracker that fails.

The logger is driven as the loop drives it (MetricsLogger with trainer.loggers); the trainer around it adds nothing
that reaches a tracker (test_trainer covers the loop's calls)."""
import json
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dapo_megatron.config import ConfigError, TrainerConfig, build_config
from dapo_megatron.train import trackers
from dapo_megatron.train.metrics import MetricsLogger

mlflow = pytest.importorskip("mlflow", reason="mlflow-skinny is not installed: pip install -e '.[test]'")
wandb = pytest.importorskip("wandb", reason="wandb is not installed: pip install -e '.[test]'")
from mlflow.tracking import MlflowClient  # noqa: E402

KEY = "rollout/reward_mean"


def _metrics(step, offset=0.0):
    return {KEY: step / 4 + offset, "rollout/accuracy": step / 8 + offset, "eval/avg@4": 0.5, "time/step_s": 1.5}


def _trainer(loggers, uri=None, **names):
    return TrainerConfig(loggers=["jsonl", *loggers], tensorboard=False,
                         mlflow=trackers.MlflowConfig(tracking_uri=uri, **names.get("mlflow", {})),
                         wandb=trackers.WandbConfig(**names.get("wandb", {})))


def _run(run_dir, steps, start=0, loggers=("mlflow",), uri=None, offset=0.0, **names):
    logger = MetricsLogger(run_dir, tensorboard=False, start_step=start, trainer=_trainer(loggers, uri, **names),
                           config={"actor": {"lr": 0.001}, "trainer": {"run_dir": str(run_dir)}})
    for step in steps:
        logger.log(step, _metrics(step, offset))
    return logger


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    # one SQLite store for the module: MLflow creates its tables in ~5-10 s, once
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _history(uri, run_dir, key=KEY):
    run_id = json.loads((Path(run_dir) / trackers.STATE_FILE).read_text())["mlflow"]["run_id"]
    return [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key)], run_id


def test_mlflow_has_every_step_and_the_config(tmp_path, mlflow_uri):
    _run(tmp_path, range(1, 6), uri=mlflow_uri, mlflow={"experiment": "toy-exp", "run_name": "first"}).close()
    history, run_id = _history(mlflow_uri, tmp_path)
    assert sorted(history) == [(s, s / 4) for s in range(1, 6)]
    client = MlflowClient(mlflow_uri)
    run = client.get_run(run_id)
    assert run.data.params["actor.lr"] == "0.001" and run.info.status == "FINISHED"
    assert run.info.run_name == "first" and client.get_experiment(run.info.experiment_id).name == "toy-exp"
    assert run.data.metrics["eval/avg_at_4"] == 0.5


def _crash_after(run_dir, uri, steps):
    logger = _run(run_dir, steps[:2], uri=uri)
    logger.flush()  # the loop flushes before the step-2 checkpoint
    for step in steps[2:]:
        logger.log(step, _metrics(step))
    logger.flush()  # step 3 reached the tracker, then the trainer died: it is replayed after the resume
    os.kill(os.getpid(), signal.SIGKILL)  # no close(): a killed trainer


def test_mlflow_killed_and_resumed_run_has_each_step_once(tmp_path, mlflow_uri):
    child = multiprocessing.get_context("fork").Process(target=_crash_after, args=(tmp_path, mlflow_uri, [1, 2, 3]))
    child.start()
    child.join(120)
    assert child.exitcode == -signal.SIGKILL
    first_id = json.loads((tmp_path / trackers.STATE_FILE).read_text())["mlflow"]["run_id"]
    _run(tmp_path, [3, 4, 5], start=2, uri=mlflow_uri, offset=100.0).close()  # resumed from the step-2 checkpoint
    history, run_id = _history(mlflow_uri, tmp_path)
    assert run_id == first_id  # the same MLflow run continues
    assert sorted(history) == [(1, 0.25), (2, 0.5), (3, 0.75), (4, 101.0), (5, 101.25)]  # each step once
    replayed, _ = _history(mlflow_uri, tmp_path, "replayed/" + KEY)
    assert replayed == [(3, 100.75)]  # the resumed run's value of the replayed step, kept beside it
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]


def test_wandb_offline_history_equals_metrics_jsonl(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    _run(tmp_path, range(1, 6), loggers=("wandb",), wandb={"project": "toy-proj", "name": "toy-run"}).close()
    (run,) = (tmp_path / "wandb").glob("offline-run-*")  # offline by default
    out = subprocess.run([str(Path(sys.executable).with_name("wandb")), "leet", "inspect", "--json", str(run)],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    (header,) = [json.loads(x)["run"] for x in out.splitlines() if '"type":"run"' in x]
    assert header["project"] == "toy-proj" and header["display_name"] == "toy-run"
    assert header["config"]["update"]["actor"] == {"lr": 0.001}  # the resolved config is the run's config
    history = [json.loads(x)["history"]["item"] for x in out.splitlines() if '"type":"history"' in x]
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == len(logged) == 5
    for h, row in zip(history, logged):
        assert h["_step"] == row["step"]
        assert {k: h[k] for k in row if k not in ("step", "time")} == {k: v for k, v in row.items()
                                                                         if k not in ("step", "time")}


def test_a_failing_tracker_warns_once_and_logging_goes_on(tmp_path, mlflow_uri, capfd, monkeypatch):
    monkeypatch.setenv("DAPO_FAULT", "enospc:tracker@3")  # the trackers' process: the delivery holding step 3 fails
    logger = _run(tmp_path, [1, 2], uri=mlflow_uri)
    logger.flush()  # steps 1-2 delivered
    for step in (3, 4, 5):
        logger.log(step, _metrics(step))
    logger.flush()
    logger.log(6, _metrics(6))
    logger.close()
    err = capfd.readouterr().err
    assert err.count("mlflow tracker failed") == 1 and "No space left on device" in err
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    assert sorted(_history(mlflow_uri, tmp_path)[0]) == [(1, 0.25), (2, 0.5)]  # off after its failure


def test_the_trackers_process_dying_warns_once_and_logging_goes_on(tmp_path, mlflow_uri, capfd, monkeypatch):
    monkeypatch.setenv("DAPO_FAULT", "tracker@2")  # SIGKILL of the trackers' process while delivering step 2
    logger = _run(tmp_path, [1, 2], uri=mlflow_uri)
    logger.flush()
    for step in (3, 4):
        logger.log(step, _metrics(step))
    logger.flush()
    logger.close()
    err = capfd.readouterr().err
    assert err.count("the trackers' process stopped answering") == 1 and "exit code -9" in err
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_loggers_choose_tensorboard(tmp_path):
    for loggers, has_events in ((["tensorboard", "jsonl"], True), (["jsonl"], False)):
        run = tmp_path / str(len(loggers))
        logger = MetricsLogger(run, trainer=TrainerConfig(loggers=loggers))
        logger.log(1, _metrics(1))
        logger.close()
        assert (run / "tensorboard").is_dir() == has_events and (run / "metrics.jsonl").is_file()


def test_loggers_are_checked_at_validation(monkeypatch):
    with pytest.raises(ConfigError, match="unknown logger 'neptune'"):
        TrainerConfig(loggers=["jsonl", "neptune"])
    with pytest.raises(ConfigError, match="must include jsonl"):
        TrainerConfig(loggers=["tensorboard"])
    monkeypatch.setitem(trackers.OPTIONAL, "wandb", "wandb_is_not_installed_here")
    with pytest.raises(ConfigError, match=r"names wandb but the wandb_is_not_installed_here package is not inst"):
        TrainerConfig(loggers=["jsonl", "wandb"])
    with pytest.raises(ConfigError, match="trainer.wandb.mode='cloud'; use offline, online or disabled"):
        build_config(None, ["trainer.wandb.mode=cloud"])
    with pytest.raises(ConfigError, match="unknown logger 'neptune'"):
        build_config(None, ["trainer.loggers=[jsonl,neptune]"])
