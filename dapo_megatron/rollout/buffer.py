"""Streaming dynamic sampling: generate prompt groups, score and length-shape each as it completes, keep
it iff its responses disagree (a group that is all right or all wrong has zero advantage), and keep
submitting until the batch is full. Bounded: after `max_num_gen_batches` batches' worth of prompts it
trains on what it has, pads, or skips the step, with a warning, and never raises (verl and DAPO crash).

Kept groups are returned in submission order (group ids grow with submission), so a deterministic
generator gives a deterministic batch whatever the completion order inside a wait.

Carry mode (`carry = True`, rollout.async_steps >= 2, train/rollout_producer.py): groups still in flight when the
batch is full are not aborted but carried into the next `collect`, as are surplus completed groups; a group whose
oldest token is older than `min_version` (set per batch by the producer) is stale: dropped (`rollout/stale_dropped`)
or generated again (`stale_policy`); a group aborted under way (a weight update that aborts requests) is generated
again. `extra_in_flight()` more groups, for the batches the producer may already start, are kept in flight so that
the engines' slots fill while a batch's last responses finish (the long tail). `state_dict(ref)` then also holds the
groups kept so far, the completed ones not yet judged, and the prompts in flight (generated again after a resume).
"""
import asyncio
import copy
import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Awaitable, Callable, Optional

from dapo_megatron.algo.filters import FILTER_METRICS, group_verdict
from dapo_megatron.algo.overlong import OverlongConfig, apply_overlong_shaping
from dapo_megatron.types import Sample

logger = logging.getLogger(__name__)

Group = list[Sample]
ON_EXHAUSTED = ("train", "pad", "skip")
STALE_POLICIES = ("drop", "regenerate")


@dataclass
class DynamicSamplingConfig:
    rollout_batch_size: int  # kept prompt groups per step
    n_samples_per_prompt: int
    enable: bool = True  # False: no filter, the first rollout_batch_size groups
    filter_metric: str = "accuracy"  # accuracy | score | reward
    over_sampling_factor: float = 1.0  # groups in flight = ceil(factor * groups still missing)
    max_num_gen_batches: int = 10  # prompt budget per step, in rollout batches; 0 = unbounded
    min_kept_groups: int = 1  # below this at the bound the step is skipped
    on_exhausted: str = "train"  # at the bound with a short batch: train on it | pad it by repeating | skip
    keep_partial: bool = False  # keep surplus completed groups for the next step instead of discarding
    abort_timeout_s: float = 60.0  # wait this long for in-flight groups after abort(), then cancel them

    def __post_init__(self):
        if self.rollout_batch_size < 1 or self.n_samples_per_prompt < 1:
            raise ValueError("rollout_batch_size and n_samples_per_prompt must be >= 1")
        if self.enable and self.n_samples_per_prompt < 2:
            raise ValueError("dynamic sampling needs n_samples_per_prompt >= 2 (a group of one is always "
                             "uniform); set dynamic_sampling.enable=false")
        if self.filter_metric not in FILTER_METRICS:
            raise ValueError(f"dynamic_sampling.filter_metric={self.filter_metric!r}; use one of {FILTER_METRICS}")
        if self.over_sampling_factor < 1.0:
            raise ValueError(f"dynamic_sampling.over_sampling_factor={self.over_sampling_factor} must be >= 1.0")
        if self.max_num_gen_batches < 0 or self.min_kept_groups < 0:
            raise ValueError("max_num_gen_batches and min_kept_groups must be >= 0")
        if self.on_exhausted not in ON_EXHAUSTED:
            raise ValueError(f"dynamic_sampling.on_exhausted={self.on_exhausted!r}; use one of {ON_EXHAUSTED}")


class DynamicSamplingBuffer:
    """`await collect()` -> (rollout_batch_size kept groups, metrics). Stateful: `state_dict()` holds the
    prompt sampler position and the pending groups, so a resume continues with the same prompts."""

    def __init__(self, cfg: DynamicSamplingConfig, prompt_source, generate_group: Callable[[Group], Awaitable[Group]],
                 scorer, overlong_cfg: Optional[OverlongConfig] = None, max_response_length: Optional[int] = None):
        self.cfg = cfg
        self.prompt_source = prompt_source
        self.generate_group = generate_group
        self.scorer = scorer
        self.overlong_cfg = overlong_cfg or OverlongConfig(enable=False)
        if self.overlong_cfg.enable and max_response_length is None:
            raise ValueError("overlong_buffer.enable needs max_response_length")
        self.max_response_length = max_response_length
        self.next_group_id = 0
        self.pending: list[Group] = []  # kept groups carried over to the next step
        # carry mode (module docstring)
        self.carry, self.min_version, self.stale_policy = False, None, "drop"
        self.extra_in_flight: Callable[[], int] = lambda: 0  # groups for later batches that may be in flight too
        self._in_flight: dict = {}  # carried across collects: task -> group
        self._kept: list[Group] = []  # the collect under way's kept groups (what a snapshot saves)
        self._scoring: list[Group] = []  # completed, out of the in-flight set, not yet kept or dropped
        self._restored: tuple = ([], [])  # from a checkpoint: (completed groups, prompt groups to generate again)

    async def collect(self, abort: Optional[Callable[[], Awaitable[None]]] = None,
                      progress: Optional[Callable[[int, Counter], None]] = None) -> tuple[list[Group], dict]:
        """`progress(num_kept, stats)` is called after every finished group (for a progress bar)."""
        batch_size, stats = self.cfg.rollout_batch_size, Counter()
        in_flight: dict[asyncio.Future, Group] = self._in_flight if self.carry else {}
        self._restore(in_flight)  # a checkpoint of carry mode, also when resumed with async_steps <= 1
        if self.carry:
            self.pending = [g for g in self.pending if not self._stale(g, in_flight, stats)]
        kept, self.pending = self.pending[:batch_size], self.pending[batch_size:]
        self._kept = kept
        try:
            while True:
                self._top_up(in_flight, len(kept), stats)
                if len(kept) >= batch_size or not in_flight:
                    break
                done, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done, key=lambda t: in_flight[t][0].group_id):
                    group = task.result()
                    del in_flight[task]
                    if self.carry and (self._aborted(group, in_flight, stats) or self._stale(group, in_flight, stats)):
                        continue
                    self._scoring.append(group)  # a snapshot while it is being scored saves it as completed
                    try:
                        accepted = await self._accept(group, stats)
                    finally:
                        self._scoring.remove(group)
                    if accepted:
                        self._keep(group, kept, stats)
                    if progress is not None:
                        progress(len(kept), stats)
            if not self.carry:
                await self._drain(in_flight, abort, stats)
        except BaseException:
            for task in in_flight:
                task.cancel()
            in_flight.clear()
            raise
        finally:
            self._kept = []
        kept.sort(key=lambda g: g[0].group_id)
        return self._finish(kept, stats)

    # ------------------------------------------------------------------ carry mode
    def _submit(self, in_flight: dict, group: Group) -> None:
        in_flight[asyncio.ensure_future(self.generate_group(group))] = group

    def _again(self, group: Group) -> Group:
        """Fresh prompt-only samples of a group, same group id and prompt (generated again)."""
        meta = {k: v for k, v in group[0].metadata.items() if k != "stale"}
        return [Sample(prompt_ids=list(s.prompt_ids), prompt_text=s.prompt_text, label=s.label, group_id=s.group_id,
                       index=s.index, metadata=copy.deepcopy(meta)) for s in group]

    def _aborted(self, group: Group, in_flight: dict, stats: Counter) -> bool:
        """A group aborted under way (a weight update that aborts requests): generated again."""
        if not any(s.finish_reason == "abort" for s in group):
            return False
        stats["groups_regenerated_aborted"] += 1
        self._submit(in_flight, self._again(group))
        return True

    def _stale(self, group: Group, in_flight: dict, stats: Counter) -> bool:
        """Has the group a token older than min_version? Then drop it or generate it again (stale_policy)."""
        if self.min_version is None or min(min(s.token_versions(), default=s.weight_version) for s in group) \
                >= self.min_version:
            return False
        for s in group:
            s.metadata["stale"] = True  # rollout dumps: drop_reason "stale"
        if self.stale_policy == "regenerate":
            stats["stale_regenerated"] += 1
            self._submit(in_flight, self._again(group))
        else:
            stats["stale_dropped"] += 1
        return True

    def _restore(self, in_flight: dict) -> None:
        """A checkpoint's completed groups (as finished tasks) and in-flight prompts (submitted again)."""
        completed, again = self._restored
        self._restored = ([], [])
        for group in completed:
            future = asyncio.get_running_loop().create_future()
            future.set_result(group)
            in_flight[future] = group
        for group in again:
            self._submit(in_flight, group)

    def cancel_in_flight(self) -> list:
        """Carry mode, at shutdown: cancel what is still generating (its requests are aborted); returns the tasks."""
        tasks = list(self._in_flight)
        for task in tasks:
            task.cancel()
        self._in_flight.clear()
        return tasks

    def _top_up(self, in_flight: dict, num_kept: int, stats: Counter) -> None:
        cfg = self.cfg
        missing = cfg.rollout_batch_size - num_kept
        factor = cfg.over_sampling_factor if cfg.enable else 1.0
        budget = cfg.max_num_gen_batches * cfg.rollout_batch_size if cfg.max_num_gen_batches else math.inf
        ahead = self.extra_in_flight() if self.carry else 0  # next batches' prompts, to keep the engines busy
        want = min(math.ceil(factor * missing) + ahead - len(in_flight), budget - stats["prompts_consumed"])
        if want <= 0:
            return
        items = self.prompt_source.next_batch(int(want))
        for item in items:
            self._submit(in_flight, self._new_group(item))
        stats["prompts_consumed"] += len(items)

    def _new_group(self, item) -> Group:
        gid, self.next_group_id = self.next_group_id, self.next_group_id + 1
        meta = {"data_source": item.data_source, **item.metadata}
        return [Sample(prompt_ids=list(item.prompt_ids), prompt_text=item.prompt_text, label=item.label,
                       group_id=gid, index=i, metadata=copy.deepcopy(meta))
                for i in range(self.cfg.n_samples_per_prompt)]

    async def _accept(self, group: Group, stats: Counter) -> bool:
        """Score and shape a finished group; True iff it passes the filter."""
        if any(s.finish_reason == "abort" for s in group):
            stats["groups_dropped_aborted"] += 1
            return False
        reward_metrics = await self.scorer.ascore_samples(group)
        apply_overlong_shaping(group, self.overlong_cfg, self.max_response_length)
        stats["groups_generated"] += 1
        stats["responses"] += len(group)
        stats["response_tokens"] += sum(s.response_length for s in group)
        stats["truncated"] += sum(s.finish_reason == "length" for s in group)
        stats["correct"] += sum(bool(s.correct) for s in group)
        stats["reward_sum"] += sum(s.reward for s in group)  # shaped reward, all responses (before the filter)
        stats["response_length_max"] = max(stats["response_length_max"], *(s.response_length for s in group))
        stats["verifier_timeouts"] += reward_metrics.get("reward/timeouts", 0)
        stats["verifier_errors"] += reward_metrics.get("reward/errors", 0)
        if not self.cfg.enable:
            return True
        verdict = group_verdict(group, self.cfg.filter_metric)
        if verdict != "keep":
            stats[f"groups_dropped_{verdict}"] += 1
        return verdict == "keep"

    def _keep(self, group: Group, kept: list, stats: Counter) -> None:
        if len(kept) < self.cfg.rollout_batch_size:
            kept.append(group)
            return
        stats["groups_surplus"] += 1
        if self.cfg.keep_partial or self.carry:  # carry mode: judged by the next batch's bound (_stale)
            self.pending.append(group)

    async def _drain(self, in_flight: dict, abort, stats: Counter) -> None:
        """The batch is full: stop the rest. Groups that still finish cleanly are surplus."""
        if not in_flight:
            return
        stats["aborts"] += 1
        if abort is not None:
            await abort()
            done, late = await asyncio.wait(in_flight, timeout=self.cfg.abort_timeout_s)
        else:
            done, late = set(), set(in_flight)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        for task in sorted(done, key=lambda t: in_flight[t][0].group_id):
            group = None if task.cancelled() or task.exception() else task.result()
            clean = group and not any(s.finish_reason == "abort" for s in group)
            if clean and self.cfg.keep_partial:
                if await self._accept(group, stats):
                    stats["groups_surplus"] += 1
                    self.pending.append(group)
            else:
                stats["groups_aborted"] += 1
        stats["groups_aborted"] += len(late)

    def _finish(self, kept: list[Group], stats: Counter) -> tuple[list[Group], dict]:
        cfg, num_kept = self.cfg, len(kept)
        skipped, padded = False, 0
        if num_kept < cfg.rollout_batch_size:
            skipped = num_kept < max(cfg.min_kept_groups, 1) or cfg.on_exhausted == "skip"
            action = "skipping the step" if skipped else ("padding" if cfg.on_exhausted == "pad" else "training on it")
            logger.warning(
                "dynamic sampling: %d of %d groups kept after %d prompts (max_num_gen_batches=%d; %d all-correct, "
                "%d all-wrong dropped); %s", num_kept, cfg.rollout_batch_size, stats["prompts_consumed"],
                cfg.max_num_gen_batches, stats["groups_dropped_all_correct"], stats["groups_dropped_all_wrong"],
                action)
            if skipped:
                # No update happens on a skipped step, so the kept groups stay on-policy: carry them.
                self.pending, kept = kept + self.pending, []
            elif cfg.on_exhausted == "pad":
                padded = cfg.rollout_batch_size - num_kept
                kept = kept + [self._copy_group(kept[i % num_kept]) for i in range(padded)]
        return kept, self._metrics(stats, num_kept if not skipped else 0, padded, skipped)

    def _copy_group(self, group: Group) -> Group:
        gid, self.next_group_id = self.next_group_id, self.next_group_id + 1
        copies = [Sample.from_state_dict(copy.deepcopy(s.state_dict())) for s in group]
        for s in copies:
            s.metadata["padded_from_group"] = s.group_id
            s.group_id = gid
        return copies

    def _metrics(self, stats: Counter, num_kept: int, padded: int, skipped: bool) -> dict:
        n = max(1, stats["responses"])
        names = ("groups_generated", "groups_dropped_all_correct", "groups_dropped_all_wrong",
                 "groups_dropped_all_equal", "groups_dropped_aborted", "groups_aborted", "groups_surplus",
                 "prompts_consumed", "aborts", "verifier_timeouts", "verifier_errors")
        if self.carry:
            names += ("stale_dropped", "stale_regenerated", "groups_regenerated_aborted", "groups_in_flight")
            stats["groups_in_flight"] = len(self._in_flight)
        metrics = {f"rollout/{k}": stats[k] for k in names}
        metrics.update({
            "rollout/groups_kept": num_kept,
            "rollout/groups_padded": padded,
            "rollout/groups_pending": len(self.pending),
            "rollout/gen_batches": math.ceil(stats["prompts_consumed"] / self.cfg.rollout_batch_size),
            "rollout/response_length_mean": stats["response_tokens"] / n,
            "rollout/truncation_rate": stats["truncated"] / n,
            "rollout/accuracy": stats["correct"] / n,
            "rollout/reward_mean": stats["reward_sum"] / n,
            "rollout/response_length_max": stats["response_length_max"],
            "rollout/generated_tokens": stats["response_tokens"],  # every generated group, kept or not
            "rollout/exhausted": int(num_kept < self.cfg.rollout_batch_size or skipped),
            "rollout/step_skipped": int(skipped),
        })
        return metrics

    def state_dict(self, ref: Optional[Callable[[Group], int]] = None) -> dict:
        """`ref` (carry mode): a group -> its index in a table of groups saved once (train/rollout_producer.py), so a
        group held in several places is one object again after a resume. Call it on the event loop's thread."""
        state = {"next_group_id": self.next_group_id, "prompt_source": self.prompt_source.state_dict()}
        if ref is None:
            state["pending"] = [[copy.deepcopy(s.state_dict()) for s in g] for g in self.pending]
            return state
        done = [t for t in self._in_flight if t.done() and not t.cancelled() and t.exception() is None]
        state["pending"] = [ref(g) for g in self._kept + self.pending]  # the collect under way starts over
        state["completed"] = [ref(g) for g in self._scoring] + [ref(t.result()) for t in done]
        state["in_flight"] = [[copy.deepcopy(s.state_dict()) for s in self._again(g)]
                              for t, g in self._in_flight.items() if t not in done]
        return state

    def load_state_dict(self, state: dict, groups: Optional[list[Group]] = None) -> None:
        def group(g):
            return groups[g] if isinstance(g, int) else [Sample.from_state_dict(copy.deepcopy(s)) for s in g]

        self.next_group_id = int(state["next_group_id"])
        self.pending = [group(g) for g in state["pending"]]
        self._restored = ([group(g) for g in state.get("completed", [])],
                          [group(g) for g in state.get("in_flight", [])])
        self.prompt_source.load_state_dict(state["prompt_source"])
