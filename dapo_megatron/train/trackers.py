"""Experiment trackers (`trainer.loggers`): W&B and MLflow, through their own libraries, beside TensorBoard and
metrics.jsonl (train/metrics.py). Rank 0 only (MetricsLogger is disabled elsewhere).

- Offline first: W&B runs in `trainer.wandb.mode`, else $WANDB_MODE, else offline (`wandb sync` uploads later);
  MLflow writes to `trainer.mlflow.tracking_uri`, else $MLFLOW_TRACKING_URI, else a local SQLite store
  run_dir/mlflow.db (MLflow 3 default store kind; its file store is deprecated).
- The resolved config is the run's parameters; project/experiment and run names come from the config.
- A resumed run (same run_dir) continues the same tracker run: the ids are kept in run_dir/trackers.json.
- Off the critical path, in a process of their own (`TrackerProcess`): the trainer pickles each step's scalars into a
  pipe and nothing else. In a thread of the trainer the libraries held its GIL (MLflow's SQLAlchemy store ~0.1 ms of
  Python per metric), grew its heap by ~240k objects (W&B, MLflow, SQLAlchemy, OpenTelemetry: every full GC of the
  trainer walks them) and their first delivery set off a ~0.4 s full GC on the trainer's GIL (BENCHMARKS.md section
  10). The process is drained before every checkpoint; it ignores SIGINT/SIGTERM/SIGUSR1 (a preempted step still
  flushes to it) and exits when its pipe closes, delivering nothing more, as a killed trainer would.
- Replayed steps: a tracker's history cannot be rewritten, so the steps a crashed run had already delivered past its
  checkpoint (recorded per tracker in trackers.json) keep their first values there, and the resumed run's values of
  those steps are logged under `replayed/<key>` at the same step (in metrics.jsonl it is the other way round: the old
  values move to metrics_replaced.jsonl). Each step appears once under each key.
- A tracker that fails (disk full, server gone) warns once and is switched off; training never stops for it, nor
  for the trackers' process dying.
"""
import gc
import importlib.util
import json
import multiprocessing
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Optional

from .faults import fault

LOGGERS = ("tensorboard", "jsonl", "wandb", "mlflow")
OPTIONAL = {"wandb": "wandb", "mlflow": "mlflow"}  # logger -> module of the `tracking` extra
STATE_FILE = "trackers.json"
DELIVER_S = 10.0  # the trackers get the steps queued since the last delivery at most this often (and at every flush)
FLUSH_TIMEOUT_S = 300.0
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


def start_trackers(trainer, run_dir, config: dict, start_step: int) -> Optional["TrackerProcess"]:
    """The trackers trainer.loggers names (besides tensorboard/jsonl), started or resumed in their own process; None
    when there are none."""
    names = [n for n in ("wandb", "mlflow") if n in trainer.loggers]
    if not names:
        return None
    config = json.loads(json.dumps(config, default=str))  # plain data for the pipe (as config.json has it)
    return TrackerProcess(names, {n: getattr(trainer, n) for n in names}, Path(run_dir), config, start_step)


def open_trackers(names: list, cfgs: dict, run_dir: Path, config: dict, start_step: int) -> Optional["Trackers"]:
    """In the trackers' process: start or resume each tracker in this process; None when none started."""
    state_file = run_dir / STATE_FILE
    state = json.loads(state_file.read_text()) if state_file.is_file() and start_step > 0 else {}
    started = []
    for name in names:
        tracker = {"wandb": WandbTracker, "mlflow": MlflowTracker}[name](cfgs[name], run_dir)
        previous = state.get(name) or {}
        # steps past the checkpoint that this tracker already holds: they are replayed now (module docstring)
        tracker.logged_upto = int(previous.get("step", 0))
        tracker.guard("starting", lambda t=tracker, prev=previous: t.start(config, prev or None, start_step))
        if not tracker.failed:
            state[name] = {**tracker.state(), "step": tracker.logged_upto}
            started.append(tracker)
    return Trackers(started, state_file, state) if started else None


class TrackerProcess:
    """The trainer's side: `log` queues (step, scalars) and returns; a thread forwards them into the pipe (a slow
    child never blocks the step); `flush` waits until the child has delivered every step logged so far (bounded);
    `close` delivers the rest, finishes the tracker runs and waits for the child."""

    def __init__(self, names: list, cfgs: dict, run_dir: Path, config: dict, start_step: int):
        ours, theirs = multiprocessing.Pipe()
        root = str(Path(__file__).resolve().parents[2])  # this checkout's dapo_megatron, installed or not
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        self._proc = subprocess.Popen([sys.executable, "-m", __name__, str(theirs.fileno())],
                                      pass_fds=[theirs.fileno()], env=env)
        theirs.close()
        self._conn, self._dead = ours, False
        # started before the first step, as W&B's init in the trainer was: its ~3 s of CPU are start-up, not steps'
        self._call(lambda: self._conn.send(("start", names, cfgs, run_dir, config, start_step)))
        self._call(self._answer)
        self._queue: "queue.Queue" = queue.Queue()
        self._thread = threading.Thread(target=self._forward, name="dapo-trackers", daemon=True)
        self._thread.start()

    def log(self, step: int, scalars: dict) -> None:
        self._queue.put(("log", step, scalars))

    def flush(self) -> None:
        done = threading.Event()
        self._queue.put(done)
        if not done.wait(FLUSH_TIMEOUT_S):
            print(f"warning: the trackers took over {FLUSH_TIMEOUT_S:.0f} s to take this run's steps; going on "
                  "without waiting (a resume may show some steps twice there)", file=sys.stderr, flush=True)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(FLUSH_TIMEOUT_S)
        try:
            self._proc.wait(5.0 if self._dead else FLUSH_TIMEOUT_S)  # it answered "done": it is exiting
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._conn.close()

    def _forward(self) -> None:
        while True:
            item = self._queue.get()
            if isinstance(item, tuple):
                self._call(lambda: self._conn.send(item))
                continue
            self._call(lambda: self._conn.send(("flush",) if item is not None else ("close",)))
            self._call(self._answer)  # the child's "done": everything before it is delivered (or its tracker off)
            if isinstance(item, threading.Event):
                item.set()
            else:
                return

    def _answer(self) -> None:
        if not self._conn.poll(FLUSH_TIMEOUT_S):
            raise TimeoutError(f"no answer in {FLUSH_TIMEOUT_S:.0f} s")
        self._conn.recv()

    def _call(self, fn) -> None:
        if self._dead:
            return
        try:
            fn()
        except (OSError, EOFError, TimeoutError) as e:
            self._dead = True
            try:
                code = self._proc.wait(5.0)  # its pipe closes as it exits: the exit code follows at once
            except subprocess.TimeoutExpired:
                code = "none, still running"
            print(f"warning: the trackers' process stopped answering ({type(e).__name__}: {e}; exit code "
                  f"{code}); the trackers are off for the rest of this run, training goes on "
                  "(metrics.jsonl has every step)", file=sys.stderr, flush=True)


def serve(conn: Connection) -> None:
    """The trackers' process: start the trackers, then deliver the steps it is sent, at most every DELIVER_S seconds
    and at every flush/close, answering each of those once they are delivered. A closed pipe (the trainer died)
    ends it at once."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):  # the trainer stops it by closing the pipe
        signal.signal(sig, signal.SIG_IGN)
    trackers = None
    pending, since = [], time.monotonic()
    while True:
        wait = max(0.0, since + DELIVER_S - time.monotonic()) if pending else None
        try:
            item = conn.recv() if conn.poll(wait) else ("deliver",)
        except (EOFError, OSError):
            os._exit(0)  # no delivery, no finish: what a killed trainer's trackers got is what they keep
        if item[0] == "log":
            pending.append(item[1:])
            continue
        if item[0] == "start":
            trackers = open_trackers(*item[1:])
            # the libraries' ~450k objects live as long as this process: a full GC skips them (260 -> 4 ms a time)
            gc.freeze()
            conn.send(("done",))
            continue
        if pending and trackers is not None:
            trackers.deliver(pending)
        pending, since = [], time.monotonic()
        if item[0] == "close" and trackers is not None:
            trackers.close()
        if item[0] in ("flush", "close"):
            conn.send(("done",))
        if item[0] == "close":
            return


class Trackers:
    """The started trackers (in the trackers' process). `deliver` hands them steps in one call where the library takes
    many (MLflow's SQLite store costs ~60 ms a call, ~4 ms a step in batches) and records each tracker's last
    delivered step in run_dir/trackers.json: a resume's replay starts at or below what the trackers hold (the trainer
    flushes before every checkpoint), so no step is missing."""

    def __init__(self, trackers: list, state_file: Path, state: dict):
        self.trackers, self.state_file, self.state = trackers, state_file, state
        self._write_state()

    def deliver(self, steps: list) -> None:
        for t in self.trackers:
            if t.log_steps(steps):
                self.state[t.name]["step"] = max(steps[-1][0], self.state[t.name]["step"])
        try:
            self._write_state()
        except OSError as e:  # trackers.json unwritable: the trackers still get their steps
            print(f"warning: {self.state_file}: {e}", file=sys.stderr, flush=True)

    def close(self) -> None:
        for t in self.trackers:
            t.close()

    def _write_state(self) -> None:
        tmp = self.state_file.with_name(STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        os.replace(tmp, self.state_file)


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

    def __init__(self, cfg, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir
        self.logged_upto = 0
        self.failed = False

    def guard(self, what: str, fn) -> bool:
        if self.failed:
            return False
        try:
            fn()
            return True
        except Exception as e:  # a tracker never stops training
            self.failed = True
            print(f"warning: {self.name} tracker failed while {what} ({type(e).__name__}: {e}); it is off for the "
                  "rest of this run, training goes on (metrics.jsonl has every step)", file=sys.stderr, flush=True)
            return False

    def log_steps(self, steps: list) -> bool:
        """[(step, scalars)] in step order; False when the tracker failed (it is then off)."""
        # steps already in the tracker from the run before the resume go under replayed/ (module docstring)
        steps = [(step, {REPLAYED + k: v for k, v in scalars.items()} if step <= self.logged_upto else scalars)
                 for step, scalars in steps]
        return self.guard(f"logging steps {steps[0][0]}-{steps[-1][0]}", lambda: self._deliver(steps))

    def _deliver(self, steps: list) -> None:
        for step, _ in steps:
            fault("tracker", step)  # DAPO_FAULT=enospc:tracker@N: the delivery holding step N fails (tests)
        self._log(steps)

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

    def _log(self, steps: list) -> None:
        for step, scalars in steps:
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

    def _log(self, steps: list) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        metrics = [Metric(mlflow_key(k), v, ts, step) for step, scalars in steps for k, v in scalars.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def _close(self) -> None:
        self.client.set_terminated(self.run_id)


def mlflow_key(key: str) -> str:
    """MLflow allows letters, digits, _ - . / space and : in names; eval/avg@4 becomes eval/avg_at_4."""
    return re.sub(r"[^\w\-./ :]", "_", key.replace("@", "_at_"))


if __name__ == "__main__":  # TrackerProcess's child: python -m dapo_megatron.train.trackers <pipe fd>
    from dapo_megatron.train.trackers import serve as _serve  # the module's own classes, not __main__'s copies

    _serve(Connection(int(sys.argv[1])))
