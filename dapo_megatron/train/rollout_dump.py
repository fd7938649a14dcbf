"""Rollout dumps (`trainer.dump_rollouts: N`): every N steps, every generated sample of the step to
run_dir/rollouts/step_<NNNNNNN>.jsonl.gz, kept or dropped by dynamic sampling; eval samples to run_dir/eval/.

One JSON record per sample (`to_record`; `to_sample` reads one back into a `Sample`). Rank 0 builds the records (plain
references to the samples' lists, no copy of the token data) and a background thread serialises, compresses and
writes them, so the step does not wait on gzip. Each file is written to a temporary name and renamed: a reader (the
report, a user) sees a whole file or none. `flush()` waits for the queue (the loop calls it before a checkpoint and at
exit); dumps are never pruned with checkpoints. A failing write (a full disk) warns once and training goes on.
"""
import gzip
import json
import os
import queue
import sys
import threading
from pathlib import Path
from typing import Iterable, Optional

from ..algo.filters import group_verdict
from ..types import Sample

ROLLOUTS_DIR = "rollouts"
EVAL_DIR = "eval"


def dump_name(step: int) -> str:
    return f"step_{step:07d}.jsonl.gz"


def to_record(s: Sample, step: int, kept: bool, drop_reason: Optional[str] = None) -> dict:
    """What a reader needs to see a sample and to check it token by token against training."""
    m = s.metadata
    return {
        "step": step, "prompt_index": m.get("row"), "group_id": s.group_id, "index": s.index, "kept": kept,
        "drop_reason": drop_reason, "data_source": m.get("data_source"), "label": s.label,
        "prompt_text": s.prompt_text, "response_text": s.response_text,
        "prompt_ids": s.prompt_ids, "response_ids": s.response_ids,
        "reward": s.reward, "score": s.score, "correct": s.correct, "advantage": m.get("advantage"),
        "finish_reason": s.finish_reason, "response_length": s.response_length,
        # the oldest version of its tokens (multi-turn: of its turns, each has its own in "turns"); per token with
        # rollout.partial_rollout when an update happened during its generation, else null
        "weight_version": s.weight_version, "weight_versions": s.weight_versions,
        "rollout_logprobs": s.rollout_logprobs,  # the engine's, per response token
        "old_logprobs": m.get("old_logprobs"),  # the trainer's (actor.recompute_old_logprobs), else null
        "loss_mask": s.loss_mask if s.loss_mask is not None else [1] * s.response_length,
        "padded_from_group": m.get("padded_from_group"),
        # multi-turn: spans of response_ids by source (model | tool), the model's with their weight version
        "turns": m.get("turns"),
    }


def to_sample(r: dict) -> Sample:
    meta = {k: r[k] for k in ("old_logprobs", "advantage", "turns") if r.get(k) is not None}
    if r.get("prompt_index") is not None:
        meta["row"] = r["prompt_index"]
    return Sample(prompt_ids=list(r["prompt_ids"]), response_ids=list(r["response_ids"]),
                  rollout_logprobs=list(r["rollout_logprobs"]), finish_reason=r["finish_reason"],
                  group_id=r["group_id"], index=r["index"], label=r["label"], prompt_text=r["prompt_text"],
                  response_text=r["response_text"], score=r["score"], reward=r["reward"], correct=r["correct"],
                  loss_mask=list(r["loss_mask"]), weight_version=r["weight_version"],
                  weight_versions=r.get("weight_versions"), metadata=meta)


def read_dump(path) -> list[dict]:
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def step_records(step: int, batch: list[Sample], generated: Iterable[list[Sample]], filter_metric: Optional[str],
                 pending: Iterable[list[Sample]] = ()) -> list[dict]:
    """The step's trained samples (kept), then the groups its rollout generated and did not train on, with why."""
    trained = {id(s) for s in batch}
    carried = {id(g[0]) for g in pending if g}
    records = [to_record(s, step, True) for s in batch]
    for group in generated:
        if not group or id(group[0]) in trained:
            continue
        records += [to_record(s, step, False, _drop_reason(group, filter_metric, carried)) for s in group]
    return records


def _drop_reason(group: list[Sample], filter_metric: Optional[str], carried: set) -> str:
    if any(s.finish_reason == "abort" for s in group):
        return "aborted"
    if group[0].metadata.get("stale"):
        return "stale"  # rollout.async_steps >= 2: a token older than the staleness bound
    if id(group[0]) in carried:
        return "carried"  # dynamic_sampling.keep_partial: trained at a later step
    if filter_metric and all(s.correct is not None for s in group):
        verdict = group_verdict(group, filter_metric)
        if verdict != "keep":
            return verdict  # all_correct | all_wrong | all_equal
    return "surplus"  # the batch was already full


class RolloutDumper:
    """Rank 0's writer thread. `submit(path, records)` returns at once; `flush()` waits until all are on disk."""

    def __init__(self, run_dir, every: int, enabled: bool = True):
        self.run_dir, self.every = Path(run_dir), every
        self.enabled = enabled and every > 0
        self._queue: "queue.Queue" = queue.Queue()
        self._warned = False
        self._thread = None
        if self.enabled:
            self._thread = threading.Thread(target=self._drain, name="dapo-rollout-dump", daemon=True)
            self._thread.start()

    def due(self, step: int) -> bool:
        return self.enabled and step % self.every == 0

    def submit(self, folder: str, step: int, records: list[dict]) -> None:
        if self.enabled:
            self._queue.put((self.run_dir / folder / dump_name(step), records))

    def flush(self) -> None:
        if self.enabled:
            self._queue.join()

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._write(*item)
            except Exception as e:  # a dump never stops training
                if not self._warned:
                    self._warned = True
                    print(f"warning: rollout dump {item[0]} failed ({e}); training goes on, later dumps may be "
                          "missing", file=sys.stderr, flush=True)
            finally:
                self._queue.task_done()

    @staticmethod
    def _write(path: Path, records: list[dict]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        try:
            # level 1: token ids and log-probs compress ~3x at a fraction of level 9's time
            with gzip.open(tmp, "wt", compresslevel=1) as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def dump_step(dumper: RolloutDumper, stage, step: int, batch, filter_metric: Optional[str]) -> None:
    """Rank 0, after the step trained: take the rollout's groups from the stage (every step, so none pile up) and
    queue the step's records when it is due."""
    generated = stage.take_generated()
    if dumper.due(step):
        dumper.submit(ROLLOUTS_DIR, step, step_records(step, batch or [], generated, filter_metric,
                                                       stage.buffer.pending))


def dump_eval(dumper: RolloutDumper, stage, step: int) -> None:
    if dumper.enabled:
        dumper.submit(EVAL_DIR, step, [to_record(s, step, None) for s in stage.last_eval_samples])
