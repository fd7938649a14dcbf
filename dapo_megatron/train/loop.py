"""The DAPO loop: generate -> reward/filter -> (old log-probs) -> train -> sync weights -> checkpoint -> eval."""
import itertools
import json
import os
import sys
import time
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path

import torch.distributed as dist

from .. import parallel
from ..config import Config
from ..placement import startup_plan
from ..rollout.client import EnginesLost
from ..rollout.engine_load import EngineLoadMeter
from ..rollout.node_engines import start_node_engines
from .actor import Actor, train_on_batch
from ..models import ckpt_layout
from .checkpoint import load_checkpoint, resume_line, save_checkpoint
from .faults import fault, hold_for_signal
from .metrics import MetricsLogger
from .reference import build_reference
from .rollout_ahead import RolloutAhead
from .rollout_producer import RolloutProducer
from .rollout_dump import RolloutDumper, dump_eval, dump_step
from .preemption import PREEMPTED_EXIT_CODE, Preemption
from .stages import RolloutStage, WeightSyncer, assign_advantages, broadcast_batch, broadcast_from_rank0


def run(cfg: Config) -> dict:
    with ExitStack() as closes:  # whatever ends the run, its engines, threads and writers are closed, newest first
        return _run(cfg, closes)


def _run(cfg: Config, closes: ExitStack) -> dict:
    preemption = Preemption()  # first: a SIGUSR1 during start-up must not kill the trainer
    closes.callback(preemption.restore)
    parallel.initialize(cfg.parallel, seed=cfg.trainer.seed)
    closes.callback(parallel.destroy)
    rank0 = dist.get_rank() == 0
    tokenizer = _tokenizer(cfg.model.path)
    actor = Actor(cfg.model, cfg.actor, cfg.algorithm, pad_id=tokenizer.pad_token_id or 0)
    reference = build_reference(cfg, pad_id=tokenizer.pad_token_id or 0)  # None unless algorithm.kl_coef > 0
    with preemption.shield_children():  # each node's local rank 0 starts its engines; every rank learns all URLs
        engines = start_node_engines(cfg)  # resolves the run's API key, once
        closes.callback(engines.shutdown)
        stage = RolloutStage(cfg, tokenizer, engines) if rank0 else None
        if stage is not None:
            closes.callback(stage.close)
    save_root = Path(cfg.trainer.save or Path(cfg.trainer.run_dir) / "checkpoints")
    syncer = WeightSyncer(cfg, stage, engines)
    closes.callback(syncer.close)
    start = _resume(cfg, actor, stage)
    t = cfg.trainer
    logger = MetricsLogger(t.run_dir, enabled=rank0, tensorboard=t.tensorboard,
                           start_step=start, trainer=t, config=cfg.to_dict())
    closes.callback(logger.close)
    dumper = RolloutDumper(t.run_dir, t.dump_rollouts, enabled=rank0)  # a background writer (rollout_dump.py)
    closes.callback(dumper.close)
    if rank0:
        print(startup_plan(cfg, dist.get_world_size(), _local_world_size()), flush=True)
        Path(cfg.trainer.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.trainer.run_dir) / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1, default=str))
    if cfg.trainer.load:
        syncer.sync(actor, version=start)  # the engine starts from model.path's weights: catch it up
    ahead = _rollout_ahead(cfg, stage) if rank0 else None
    if ahead is not None:
        closes.callback(ahead.close)
    last, preempted = {}, False
    lost, saved = None, start  # lost: rank 0's EnginesLost, the run's end after a checkpoint of the last finished step
    load = EngineLoadMeter(stage.client) if rank0 else None  # rollout/engine_busy_fraction, one window per step
    if load is not None:
        load.sample()
    for step in range(start, cfg.trainer.num_steps):
        times = {}
        with _timer(times, "rollout"):  # with rollout.async_steps=1, the rollout started during the last step
            groups, rollout_metrics, lost = _next_rollout(ahead, lost) if rank0 else (None, None, None)
            batch = broadcast_batch(assign_advantages(groups, cfg) if groups is not None else None)
        if batch is None:  # rank 0 lost its engines (nothing else sends None): every rank saves the last finished step
            saved = _save_finished(save_root, step, saved, actor, _rollout_state(ahead, lost), cfg, dumper, logger)
            break
        final = step + 1 == cfg.trainer.num_steps or _out_of_budget(cfg, rollout_metrics)
        if rank0 and not final and not _due(step, cfg.trainer.save_interval, 0):
            ahead.start()  # async_steps=1: the next rollout generates while this step trains (drained before a save)
        train_metrics = {}
        if batch:  # an empty batch means the dynamic-sampling bound was hit with on_exhausted=skip
            with colocated(stage):  # colocated SGLang engines release GPU memory while the actor works
                if cfg.actor.recompute_old_logprobs:
                    with _timer(times, "old_logprobs"):
                        actor.compute_logprobs(batch)
                    train_metrics["rollout/train_infer_logprob_diff_max"] = _logprob_gap(batch)
                if reference is not None:
                    with _timer(times, "ref_logprobs"):
                        train_metrics.update(reference.step(batch, cfg.algorithm))
                _inject_fault(step)
                with _timer(times, "train"):
                    train_metrics.update(_mean(train_on_batch(actor, batch)))
            if rank0:
                with _timer(times, "rollout_wait"):  # the engines take new weights only between rollouts
                    ahead.wait()
            with _timer(times, "sync"), ahead.weight_update() if rank0 else nullcontext():
                try:  # async_steps>=2: partial rollouts pause
                    train_metrics.update(syncer.sync(actor, version=step + 1))
                except EnginesLost as e:  # this step trained: logged and checkpointed, then the run ends on it
                    lost = e
        if rank0 and dumper.enabled:
            dump_step(dumper, stage, step + 1, batch, cfg.sampling().enable and cfg.sampling().filter_metric)
        eval_metrics = {}
        if cfg.eval.path and cfg.trainer.eval_interval and ((step + 1) % cfg.trainer.eval_interval == 0 or final):
            if rank0:
                ahead.wait()  # a skipped step (empty batch) did not wait: the engines serve one caller at a time
            eval_metrics = stage.evaluate(tokenizer) if rank0 else {}
            if rank0:
                dump_eval(dumper, stage, step + 1)
            dist.barrier()
        last = {**(rollout_metrics or {}), **train_metrics, **eval_metrics, **(load.sample() if load else {}),
                **{f"time/{k}_s": v for k, v in times.items()}, "time/step_s": sum(times.values())}
        logger.log(step + 1, last)  # before the save: a checkpoint's steps are always in metrics.jsonl
        if final or _due(step, cfg.trainer.save_interval, cfg.trainer.num_steps):
            dumper.flush()  # a checkpoint's steps have their dumps on disk and in the trackers
            logger.flush()
            with _timer(times, "save"):
                save_checkpoint(save_root, step + 1, actor, _trainer_state(step + 1, ahead), cfg.model.path,
                                keep_last=cfg.trainer.keep_last)
            saved = step + 1
        hold_for_signal(step + 1, lambda: preemption.signum is not None)  # preemption tests only (faults.py)
        if final:  # trainer.num_steps, or trainer.max_generated_tokens spent
            break
        if preemption.requested():  # SIGTERM / SIGUSR1: save, exit 75
            if not _due(step, cfg.trainer.save_interval, cfg.trainer.num_steps):
                dumper.flush()
                logger.flush()
                save_checkpoint(save_root, step + 1, actor, _trainer_state(step + 1, ahead), cfg.model.path,
                                keep_last=cfg.trainer.keep_last)
            preempted = True
            break
    closes.close()
    if lost is not None:
        where = cfg.trainer.load if saved == start and cfg.trainer.load else save_root
        raise type(lost)(f"{lost}; {_resume_hint(where, saved)}") from None
    if preempted:
        print(f"preempted: checkpoint saved at step {step + 1}; exiting with {PREEMPTED_EXIT_CODE}", flush=True)
        sys.exit(PREEMPTED_EXIT_CODE)
    return last


def _local_world_size() -> int:
    for var in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return dist.get_world_size()


def _resume(cfg: Config, actor: Actor, stage) -> int:
    """Load trainer.load (verified by its manifest; see ckpt_layout) and claim the save folder for this lineage."""
    if not cfg.trainer.load:
        return 0
    rank0 = dist.get_rank() == 0
    say = (lambda msg: print(msg, flush=True)) if rank0 else (lambda msg: None)
    path, manifest = ckpt_layout.resolve(cfg.trainer.load, log=say)
    say(resume_line(cfg.trainer.load, path, manifest))
    state = load_checkpoint(path, actor, manifest)
    if stage is not None and state.get("rollout"):
        stage.load_state_dict(state["rollout"])
    start = int(state.get("iteration", 0))
    if rank0:
        ckpt_layout.claim_for_resume(Path(cfg.trainer.save or Path(cfg.trainer.run_dir) / "checkpoints"), path,
                                     manifest, log=say)
    dist.barrier()
    return start


@contextmanager
def colocated(stage):
    with stage.engine_memory_released() if stage is not None else nullcontext():
        yield


def _logprob_gap(batch) -> float:
    """Max |trainer - engine| log-prob over the batch's model tokens (loss mask 1; a tool result's tokens have no
    engine log-prob): ~0 when weight sync and both forward passes agree."""
    return max((abs(a - b) for s in batch
                for a, b, m in zip(s.metadata["old_logprobs"], s.rollout_logprobs, s.loss_mask or itertools.repeat(1))
                if m), default=0.0)


def _next_rollout(ahead, lost):
    """Rank 0: (groups, metrics, None), or (None, None, EnginesLost) once the engines are gone for good (a
    supervisor past its restart bound, external engines that did not come back): the run then stops, after a
    checkpoint of the last finished step with the rollout state from before the rollout that failed."""
    if lost is not None:
        return None, None, lost
    before = ahead.state_dict()
    try:
        return *ahead.next(), None
    except EnginesLost as e:
        e.rollout_state = before
        return None, None, e


def _rollout_state(ahead, lost):
    return getattr(lost, "rollout_state", None) or (ahead.state_dict() if ahead is not None else None)


def _save_finished(save_root, step: int, saved: int, actor, rollout_state, cfg, dumper, logger) -> int:
    """Collective: the checkpoint of the last finished step (`step` steps done) unless it exists; returns it."""
    if step in (saved, 0):
        return saved
    dumper.flush()
    logger.flush()
    save_checkpoint(save_root, step, actor, {"rollout": rollout_state, "tensorboard_step": step}, cfg.model.path,
                    keep_last=cfg.trainer.keep_last)
    return step


def _resume_hint(save_root, saved: int) -> str:
    if not saved:
        return "no step finished, nothing to resume: start the run again"
    return f"the last finished step, {saved}, is checkpointed: resume with trainer.load={save_root}"


def _inject_fault(step: int) -> None:
    fault("train", step + 1)  # DAPO_FAULT=train@N SIGKILLs mid-step N (the one fault mechanism: faults.py)


def _trainer_state(iteration: int, ahead) -> dict:
    # Only rank 0 writes trainer_state.json, and only rank 0 has the rollout stage.
    return {"rollout": ahead.state_dict() if ahead is not None else None, "tensorboard_step": iteration}


def _out_of_budget(cfg: Config, rollout_metrics) -> bool:
    """trainer.max_generated_tokens: has this step's rollout spent the run's budget? (Collective when set.)"""
    budget = cfg.trainer.max_generated_tokens
    if not budget:
        return False
    spent = rollout_metrics["rollout/generated_tokens_total"] if rollout_metrics is not None else None
    return broadcast_from_rank0(spent >= budget if spent is not None else None)


def _rollout_ahead(cfg: Config, stage):
    """async_steps 0 / 1: RolloutAhead (in place / one rollout ahead); k >= 2: the continuous RolloutProducer."""
    r = cfg.rollout
    if r.async_steps >= 2:
        return RolloutProducer(stage, r.async_steps, r.partial_rollout, r.stale_policy)
    return RolloutAhead(stage, r.async_steps, _staleness_bound(cfg))


def _staleness_bound(cfg: Config) -> int:
    """Versions a sample may lag the trainer: rollout.async_steps, plus the one of groups carried by keep_partial
    (refused with async_steps, config.py)."""
    return cfg.rollout.async_steps + int(cfg.sampling().keep_partial)


def _due(step: int, interval: int, num_steps: int) -> bool:
    return step + 1 == num_steps or (interval > 0 and (step + 1) % interval == 0)


def _mean(records: list[dict]) -> dict:
    keys = records[0].keys() if records else []
    return {k: sum(r[k] for r in records) / len(records) for k in keys}


@contextmanager
def _timer(times: dict, name: str):
    t0 = time.perf_counter()
    yield
    times[name] = times.get(name, 0.0) + time.perf_counter() - t0


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
