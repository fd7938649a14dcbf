"""Dynamic-sampling buffer against a scripted engine: a prompt's label k says how many of its G responses
are correct (k = 0 or G: the group is dropped), and each group finishes after a scripted number of
event-loop ticks, so completion order is deterministic and differs from submission order."""
import asyncio
import json
import logging

import pytest

from dapo_megatron.algo.overlong import OverlongConfig
from dapo_megatron.data.dataset import PromptDataset, PromptItem
from dapo_megatron.reward import RewardConfig, RewardScorer
from dapo_megatron.rollout.buffer import DynamicSamplingBuffer, DynamicSamplingConfig

G = 4


class ScriptedPrompts:
    def __init__(self, ks):
        self.ks, self.position = list(ks), 0

    def next_batch(self, n):
        out = []
        for _ in range(n):
            i = self.position
            out.append(PromptItem([100 + i], f"p{i}", str(self.ks[i % len(self.ks)]), "toy", {"row": i}))
            self.position += 1
        return out

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


class ScriptedEngine:
    def __init__(self, ticks=None, lengths=None, finish=None):
        self.ticks = ticks or {}  # prompt row -> ticks before it finishes (default 1)
        self.lengths = lengths or {}  # (row, index) -> response length (default 5)
        self.finish = finish or {}  # (row, index) -> finish reason (default "stop")
        self.running, self.to_abort, self.submitted, self.abort_calls = set(), set(), [], 0

    async def generate(self, group):
        gid, row = group[0].group_id, group[0].metadata["row"]
        self.submitted.append(row)
        self.running.add(gid)
        try:
            for _ in range(10 * self.ticks.get(row, 1)):  # x10: asyncio.wait itself takes a few loop turns
                if gid in self.to_abort:
                    for s in group:
                        s.finish_reason = "abort"
                    return group
                await asyncio.sleep(0)
            for s in group:
                n = self.lengths.get((row, s.index), 5)
                s.response_ids, s.rollout_logprobs = [7] * n, [-0.5] * n
                s.response_text = f"#### {s.label if s.index < int(s.label) else -1}"
                s.finish_reason = self.finish.get((row, s.index), "stop")
            return group
        finally:
            self.running.discard(gid)

    async def abort(self):
        self.abort_calls += 1
        self.to_abort |= self.running


class LabelScorer:
    """Response i of a group with label k is correct iff i < k; reports `timeouts` per call."""

    def __init__(self, timeouts=0):
        self.timeouts = timeouts

    async def ascore_samples(self, samples):
        for s in samples:
            s.correct = s.index < int(s.label)
            s.score = float(s.correct)
            s.reward = 1.0 if s.correct else -1.0
        return {"reward/timeouts": self.timeouts, "reward/errors": 0}


def make(ks, engine=None, scorer=None, overlong=None, max_len=None, **cfg):
    engine = engine or ScriptedEngine()
    cfg = DynamicSamplingConfig(rollout_batch_size=cfg.pop("B", 3), n_samples_per_prompt=G, **cfg)
    buf = DynamicSamplingBuffer(cfg, ScriptedPrompts(ks), engine.generate, scorer or LabelScorer(), overlong, max_len)
    return buf, engine


def collect(buf, engine):
    return asyncio.run(buf.collect(abort=engine.abort))


def rows(groups):
    return [g[0].metadata["row"] for g in groups]


def test_exact_kept_and_dropped_counts():
    # Passing prompts (0 < k < 4): rows 1, 4, 6. With factor 1 the shortest such prefix (7 prompts) is used.
    buf, engine = make([4, 2, 0, 0, 3, 4, 1, 2, 2], B=3, engine=ScriptedEngine(ticks={0: 4, 1: 3, 2: 1}))
    groups, m = collect(buf, engine)
    assert rows(groups) == [1, 4, 6] and engine.submitted == list(range(7))
    assert [g[0].group_id for g in groups] == [1, 4, 6]
    assert all([s.index for s in g] == [0, 1, 2, 3] and len({s.group_id for s in g}) == 1 for g in groups)
    assert [[s.correct for s in g] for g in groups][0] == [True, True, False, False]
    assert {k: m[f"rollout/{k}"] for k in ("groups_generated", "groups_kept", "groups_dropped_all_correct",
                                            "groups_dropped_all_wrong", "prompts_consumed", "gen_batches",
                                            "aborts", "step_skipped", "groups_aborted")} == {
        "groups_generated": 7, "groups_kept": 3, "groups_dropped_all_correct": 2, "groups_dropped_all_wrong": 2,
        "prompts_consumed": 7, "gen_batches": 3, "aborts": 0, "step_skipped": 0, "groups_aborted": 0}
    assert m["rollout/accuracy"] == pytest.approx((4 + 2 + 3 + 4 + 1) / 28)
    assert m["rollout/response_length_mean"] == 5 and m["rollout/truncation_rate"] == 0


def test_over_sampling_aborts_the_rest_and_orders_by_submission():
    # factor 2: four groups in flight for B = 2; rows 1 and 2 finish first, rows 0 and 3 are aborted.
    engine = ScriptedEngine(ticks={0: 5, 1: 1, 2: 3, 3: 9})
    buf, _ = make([2], B=2, over_sampling_factor=2.0, engine=engine)
    groups, m = collect(buf, engine)
    assert rows(groups) == [1, 2] and engine.submitted == [0, 1, 2, 3]
    assert engine.abort_calls == 1 and m["rollout/aborts"] == 1 and m["rollout/groups_aborted"] == 2
    assert m["rollout/prompts_consumed"] == 4 and m["rollout/groups_generated"] == 2


def test_over_sampling_refills_as_groups_are_dropped():
    # factor 1.5, B = 2: ceil(3) in flight; after a drop the target is still ceil(1.5 * 2) = 3.
    engine = ScriptedEngine(ticks={0: 1, 1: 2, 2: 6, 3: 2, 4: 9})
    buf, _ = make([0, 2, 2, 1, 3], B=2, over_sampling_factor=1.5, engine=engine)
    groups, m = collect(buf, engine)
    # row 0 dropped at tick 1 -> row 3 submitted; rows 1 and 3 pass at tick 2 -> batch full, row 2 aborted.
    assert rows(groups) == [1, 3] and engine.submitted == [0, 1, 2, 3]
    assert m["rollout/groups_dropped_all_wrong"] == 1 and m["rollout/groups_aborted"] == 1


@pytest.mark.parametrize("keep_partial", [False, True])
def test_surplus_groups_discarded_or_kept_for_next_step(keep_partial):
    engine = ScriptedEngine(ticks={0: 1, 1: 1, 2: 1, 3: 5})
    buf, _ = make([2], B=2, over_sampling_factor=2.0, keep_partial=keep_partial, engine=engine)
    groups, m = collect(buf, engine)
    assert rows(groups) == [0, 1] and m["rollout/groups_surplus"] == 1
    assert m["rollout/groups_pending"] == int(keep_partial) and m["rollout/groups_aborted"] == 1
    groups, m = collect(buf, engine)
    assert rows(groups) == ([2, 4] if keep_partial else [4, 5])
    assert m["rollout/prompts_consumed"] == (2 if keep_partial else 4)  # pending row 2 fills one slot


@pytest.mark.parametrize("on_exhausted,kept_rows,padded,skipped", [
    ("train", [1, 5], 0, 0), ("pad", [1, 5, 1, 5], 2, 0), ("skip", [], 0, 1),
])
def test_bound_reached_without_crash(on_exhausted, kept_rows, padded, skipped, caplog):
    ks = [4, 2, 4, 4, 0, 1, 4, 4] + [3, 4, 2] + [4] * 20
    buf, engine = make(ks, B=4, max_num_gen_batches=2, on_exhausted=on_exhausted)
    with caplog.at_level(logging.WARNING):
        groups, m = collect(buf, engine)
    assert rows(groups) == kept_rows and len(engine.submitted) == 8
    assert (m["rollout/groups_padded"], m["rollout/step_skipped"], m["rollout/gen_batches"]) == (padded, skipped, 2)
    assert m["rollout/groups_kept"] == (0 if skipped else 2)
    assert "2 of 4 groups kept after 8 prompts (max_num_gen_batches=2; 5 all-correct, 1 all-wrong dropped)" in caplog.text
    if padded:  # copies get fresh group ids so that advantages stay per group
        assert len({g[0].group_id for g in groups}) == 4
        assert [s.response_ids for s in groups[2]] == [s.response_ids for s in groups[0]]
    if skipped:  # no update happened, so the kept groups are still on-policy: carried to the next step
        assert m["rollout/groups_pending"] == 2
        groups, m = collect(buf, engine)
        assert rows(groups) == [1, 5, 8, 10] and m["rollout/step_skipped"] == 0
        assert m["rollout/groups_kept"] == 4 and m["rollout/prompts_consumed"] == 3


def test_below_min_kept_groups_skips_and_nothing_kept_cannot_pad():
    buf, engine = make([2, 4, 4, 4], B=2, max_num_gen_batches=2, min_kept_groups=2, on_exhausted="train")
    groups, m = collect(buf, engine)
    assert groups == [] and m["rollout/step_skipped"] == 1
    buf, engine = make([4], B=2, max_num_gen_batches=1, on_exhausted="pad")
    groups, m = collect(buf, engine)
    assert groups == [] and m["rollout/step_skipped"] == 1 and m["rollout/groups_dropped_all_correct"] == 2


def test_unbounded_budget_keeps_going():
    buf, engine = make([4] * 50 + [1], B=1, max_num_gen_batches=0)
    groups, m = collect(buf, engine)
    assert rows(groups) == [50] and m["rollout/prompts_consumed"] == 51


def test_disabled_returns_the_first_groups_unfiltered():
    buf, engine = make([4, 0, 2, 4], B=3, enable=False)
    groups, m = collect(buf, engine)
    assert rows(groups) == [0, 1, 2] and m["rollout/prompts_consumed"] == 3
    assert m["rollout/groups_dropped_all_correct"] == 0 and m["rollout/groups_kept"] == 3


def test_overlong_shaping_and_filter_on_reward():
    # All four responses correct (k=4) but two run into the buffer: rewards differ, so `reward` keeps the group.
    lengths = {(0, 1): 18, (0, 2): 20}
    finish = {(0, 2): "length"}
    overlong = OverlongConfig(enable=True, len=4, penalty_factor=1.0, mask_truncated=True)
    for metric, kept in (("reward", [0]), ("accuracy", [])):
        engine = ScriptedEngine(lengths=lengths, finish=finish)
        buf, _ = make([4], B=1, max_num_gen_batches=1, filter_metric=metric, overlong=overlong, max_len=20,
                      engine=engine)
        groups, m = collect(buf, engine)
        assert rows(groups) == kept
        assert m["rollout/truncation_rate"] == 0.25 and m["rollout/response_length_mean"] == (5 + 18 + 20 + 5) / 4
        if groups:
            assert [s.reward for s in groups[0]] == [1.0, 0.5, 0.0, 1.0]
            assert [s.loss_mask for s in groups[0]] == [None, None, [0] * 20, None]
    assert m["rollout/groups_dropped_all_correct"] == 1


def test_verifier_timeouts_and_aborted_groups_are_counted():
    engine = ScriptedEngine(finish={(1, 0): "abort"})
    buf, _ = make([2, 2, 2], B=2, scorer=LabelScorer(timeouts=1), engine=engine)
    groups, m = collect(buf, engine)
    assert rows(groups) == [0, 2] and m["rollout/groups_dropped_aborted"] == 1
    assert m["rollout/verifier_timeouts"] == 2  # one per scored group


def test_group_ids_unique_across_steps():
    buf, engine = make([1, 4, 2], B=2)
    ids = [s.group_id for _ in range(3) for g in collect(buf, engine)[0] for s in g]
    assert len(set(ids)) == 6 and ids == sorted(ids)


def test_generator_error_propagates_and_cancels_the_rest():
    class Broken(ScriptedEngine):
        async def generate(self, group):
            if group[0].metadata["row"] == 1:
                raise ConnectionError("engine down")
            return await super().generate(group)

    engine = Broken(ticks={0: 50})
    buf, _ = make([2], B=2, engine=engine)
    with pytest.raises(ConnectionError, match="engine down"):
        collect(buf, engine)


def _dataset(path):
    class CharTokenizer:
        chat_template = None

        def encode(self, text, add_special_tokens=True):
            return [ord(c) for c in text]

    return PromptDataset(path, CharTokenizer(), template="none", seed=5)


def _run_steps(buf, engine, n):
    out = []
    for _ in range(n):
        groups, m = collect(buf, engine)
        out.append(([(s.group_id, s.prompt_text, s.reward, s.response_text) for g in groups for s in g],
                    m["rollout/prompts_consumed"]))
    return out


def _real_buffer(path, engine):
    cfg = DynamicSamplingConfig(rollout_batch_size=2, n_samples_per_prompt=G, over_sampling_factor=2.0,
                                keep_partial=True)
    scorer = RewardScorer(RewardConfig(type="gsm8k", num_workers=0))
    return DynamicSamplingBuffer(cfg, _dataset(path), engine.generate, scorer)


@pytest.mark.parametrize("split", [1, 2])  # after step 1 the state holds 2 pending surplus groups
def test_state_save_restore_resumes_identically(tmp_path, split):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": k}) + "\n"
                            for i, k in enumerate([4, 1, 0, 3, 2, 2, 4, 1, 3, 0, 2])))
    ticks = {i: 1 + i % 3 for i in range(11)}  # completion order differs from submission order; ties give surplus
    # Straight run of 4 steps with the real gsm8k scorer (in-process) and the real dataset sampler.
    engine = ScriptedEngine(ticks=ticks)
    buf = _real_buffer(path, engine)
    straight = _run_steps(buf, engine, 4)
    assert any(s[2] == 1.0 for s in straight[0][0]) and any(s[2] == -1.0 for s in straight[0][0])

    engine = ScriptedEngine(ticks=ticks)
    first = _real_buffer(path, engine)
    head = _run_steps(first, engine, split)
    state = json.loads(json.dumps(first.state_dict()))  # what trainer_state.json stores
    assert len(state["pending"]) == (2 if split == 1 else 0)
    engine = ScriptedEngine(ticks=ticks)
    resumed = _real_buffer(path, engine)
    resumed.load_state_dict(state)
    assert head + _run_steps(resumed, engine, 4 - split) == straight
