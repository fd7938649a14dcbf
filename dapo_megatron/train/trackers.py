"""Experiment trackers (`trainer.loggers`): W&B and MLflow, through their own libraries, beside TensorBoard and
metrics.jsonl (train/metrics.py). Rank 0 only (MetricsLogger is disabled elsewhere).

- Offline first: W&B runs in `trainer.wandb.mode`, else $WANDB_MODE, else offline (`wandb sync` uploads later);
  MLflow writes to `trainer.mlflow.tracking_uri`, else $MLFLOW_TRACKING_URI, else a local SQLite store
  run_dir/mlflow.db (MLflow 3 default store kind; its file store is deprecated).
- The resolved config is the run's parameters; project/experiment and run names come from the config.
- A resumed run (same run_dir) continues the same tracker run: the ids are kept in run_dir/trackers.json.
- Replayed steps: a tracker's history cannot be rewritten, so the steps a crashed run had already logged past its
  checkpoint keep their first values there, and the resumed run's values of those steps are logged under
  `replayed/<key>` at the same step (in metrics.jsonl it is the other way round: the old values move to
  metrics_replaced.jsonl). Each step appears once under each key.
- A tracker that fails (disk full, server gone) warns once and is switched off; training never stops for it.
"""
import importlib.util
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

LOGGERS = ("tensorboard", "jsonl", "wandb", "mlflow")
OPTIONAL = {"wandb": "wandb", "mlflow": "mlflow"}  # logger -> module of the `tracking` extra
STATE_FILE = "trackers.json"
REPLAYED = "replayed/"


@dataclass
class WandbConfig:
    project: str = "dapo_megatron"
    name: Optional[str] = None  # default: the run_dir folder's name
    mode: Optional[str] = None  # offline | online | disabled; default: $WANDB_MODE, else offline

    def __post_init__(self):
        if self.mode not in (None, "offline", "online", "disabled"):
            raise ValueError(f"trainer.wandb.mode={self.mode!r}; use offline, online or disabled")


@dataclass
class MlflowConfig:
    tracking_uri: Optional[str] = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///<run_dir>/mlflow.db
    experiment: str = "dapo_megatron"
    run_name: Optional[str] = None  # default: the run_dir folder's name


def check_loggers(loggers) -> None:
    """Validation: known names, jsonl present, the optional libraries installed. Raises ValueError (one line)."""
    if not isinstance(loggers, list) or not all(isinstance(x, str) for x in loggers):
        raise ValueError(f"trainer.loggers={loggers!r} must be a list, e.g. [tensorboard, jsonl, wandb]")
    for name in loggers:
        if name not in LOGGERS:
            raise ValueError(f"trainer.loggers: unknown logger {name!r}; use some of {', '.join(LOGGERS)}")
        if name in OPTIONAL and importlib.util.find_spec(OPTIONAL[name]) is None:
            raise ValueError(f"trainer.loggers names {name} but the {OPTIONAL[name]} package is not installed; "
                             f"pip install 'dapo_megatron[tracking]' (or drop {name} from trainer.loggers)")
    if "jsonl" not in loggers:
        raise ValueError("trainer.loggers must include jsonl: metrics.jsonl is the run's record (resume, report)")


def start_trackers(trainer, run_dir, config: dict, start_step: int, logged_upto: int) -> list:
    """The trackers trainer.loggers names (besides tensorboard/jsonl), started or resumed. `logged_upto`: the last
    step the run had logged before this start (steps start_step+1..logged_upto are replayed)."""
    run_dir = Path(run_dir)
    state_file = run_dir / STATE_FILE
    state = json.loads(state_file.read_text()) if state_file.is_file() and start_step > 0 else {}
    logged_upto = logged_upto if start_step > 0 else 0  # a fresh start is a new tracker run
    out = []
    for name, cls in (("wandb", WandbTracker), ("mlflow", MlflowTracker)):
        if name not in trainer.loggers:
            continue
        tracker = cls(getattr(trainer, name), run_dir, logged_upto)
        tracker.guard("starting", lambda t=tracker: t.start(config, state.get(t.name), start_step))
        if not tracker.failed:
            state[name] = tracker.state()
            out.append(tracker)
    if out:
        tmp = state_file.with_name(STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, state_file)
    return out


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class Tracker:
    name = ""

    def __init__(self, cfg, run_dir: Path, logged_upto: int):
        self.cfg, self.run_dir, self.logged_upto = cfg, run_dir, logged_upto
        self.failed = False

    def guard(self, what: str, fn) -> None:
        if self.failed:
            return
        try:
            fn()
        except Exception as e:  # a tracker never stops training
            self.failed = True
            print(f"warning: {self.name} tracker failed while {what} ({type(e).__name__}: {e}); it is off for the "
                  "rest of this run, training goes on (metrics.jsonl has every step)", file=sys.stderr, flush=True)

    def log(self, step: int, scalars: dict) -> None:
        if step <= self.logged_upto:  # already in the tracker from the run before the resume (module docstring)
            scalars = {REPLAYED + k: v for k, v in scalars.items()}
        self.guard(f"logging step {step}", lambda: self._log(step, scalars))

    def close(self) -> None:
        self.guard("closing", self._close)

    def run_name(self, name: Optional[str]) -> str:
        return name or self.run_dir.resolve().name


class WandbTracker(Tracker):
    name = "wandb"

    def start(self, config: dict, state: Optional[dict], start_step: int) -> None:
        import wandb

        mode = self.cfg.mode or os.environ.get("WANDB_MODE") or "offline"
        self.run = wandb.init(project=self.cfg.project, name=self.run_name(self.cfg.name), dir=str(self.run_dir),
                              mode=mode, id=(state or {}).get("id"), resume="allow", config=config,
                              settings=wandb.Settings(console="off", x_disable_stats=True))

    def state(self) -> dict:
        return {"id": self.run.id}

    def _log(self, step: int, scalars: dict) -> None:
        self.run.log(scalars, step=step)

    def _close(self) -> None:
        self.run.finish()


class MlflowTracker(Tracker):
    name = "mlflow"

    def start(self, config: dict, state: Optional[dict], start_step: int) -> None:
        from mlflow.tracking import MlflowClient

        uri = self.cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or \
            f"sqlite:///{(self.run_dir / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=uri)
        self.uri = uri
        if state and state.get("tracking_uri") == uri:
            self.run_id = state["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            have = set(self.client.get_run(self.run_id).data.params)
        else:
            exp = self.client.get_experiment_by_name(self.cfg.experiment)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(self.cfg.experiment)
            self.run_id = self.client.create_run(exp_id, run_name=self.run_name(self.cfg.run_name)).info.run_id
            have = set()
        self._log_params({k: v for k, v in flatten(config).items() if k not in have})  # params are write-once

    def _log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def state(self) -> dict:
        return {"run_id": self.run_id, "tracking_uri": self.uri}

    def _log(self, step: int, scalars: dict) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        metrics = [Metric(mlflow_key(k), v, ts, step) for k, v in scalars.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def _close(self) -> None:
        self.client.set_terminated(self.run_id)


def mlflow_key(key: str) -> str:
    """MLflow allows letters, digits, _ - . / space and : in names; eval/avg@4 becomes eval/avg_at_4."""
    return re.sub(r"[^\w\-./ :]", "_", key.replace("@", "_at_"))
