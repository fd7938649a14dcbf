"""rollout.async_steps >= 2: the continuous producer's gate, the per-token staleness bound and stale_policy, partial
rollouts on the embedded engine (tokens of two versions, each with its own log-probs), and a kill-and-resume that
generates every prompt exactly once."""
import asyncio
import collections
import copy
import gzip
import json

import pytest
import torch

from dapo_megatron.config import ConfigError, load_config, validate
from dapo_megatron.data.sampler import EpochSampler
from dapo_megatron.models.tiny import make_tiny_hf_model
from dapo_megatron.rollout.client import RolloutClient, token_versions
from dapo_megatron.rollout.engine import Engine
from dapo_megatron.train.rollout_ahead import RolloutAhead, check_staleness
from dapo_megatron.train.rollout_producer import RolloutProducer
from dapo_megatron.types import Sample, WeightVersion
from test_buffer import G, ScriptedEngine, make, rows
from test_engine import hf_model, teacher_forced_logprobs
from test_multi_turn import TurnFleet, chars, fenced_runner, run, tok  # noqa: F401 (tok is a fixture)
from test_trainer import _args, _metrics, _train, toy  # noqa: F401, F811 (toy is a fixture)
from waiting import held, result, wait_until

WAIT_S = 60


# ----------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("override, key", [
    (["rollout.async_steps=2", "rollout.stale_policy=keep"], "rollout.stale_policy='keep'"),
    (["rollout.async_steps=1", "rollout.partial_rollout=true"], "rollout.partial_rollout=true needs"),
    (["rollout.stale_policy=regenerate"], "rollout.stale_policy=regenerate needs"),
    (["rollout.async_steps=2", "dynamic_sampling.on_exhausted=skip"], "dynamic_sampling.on_exhausted=skip"),
    (["rollout.async_steps=3", "dynamic_sampling.keep_partial=true"], "dynamic_sampling.keep_partial"),
])
def test_refused_in_one_line(toy, tmp_path, override, key):  # noqa: F811
    with pytest.raises(ConfigError) as e:
        validate(load_config(None, _args(toy, tmp_path / "run", 2, extra=override)), world_size=1)
    assert key in str(e.value) and "\n" not in str(e.value)


def test_k2_with_save_every_step_is_accepted(toy, tmp_path):  # noqa: F811
    """k >= 2 never drains the producer (a checkpoint saves what is buffered and in flight): not refused as k = 1."""
    extra = ["rollout.async_steps=2", "trainer.save_interval=1", "rollout.partial_rollout=true",
             "rollout.stale_policy=regenerate"]
    validate(load_config(None, _args(toy, tmp_path / "run", 2, extra=extra)), world_size=1)


# ----------------------------------------------------------------------------------------------- per-token versions
def test_sglang_weight_version_spans_to_one_version_per_token():
    spans = [{"version": "3", "start": 0, "end": 2}, {"version": "4", "start": 2, "end": 5}]  # SGLang's meta_info
    assert token_versions(spans, 5) == [3, 3, 4, 4, 4]
    assert token_versions(spans, 0) is None and token_versions(None, 5) is None
    assert token_versions(spans[:1], 5) is None  # not covering every token: not trusted
    assert token_versions([{"version": "default", "start": 0, "end": 2}] + spans[1:], 5) == [0, 0, 4, 4, 4]


def test_staleness_lag_is_per_token():
    a = Sample(prompt_ids=[1], response_ids=[5, 6, 7], weight_version=1, weight_versions=[1, 2, 3])
    b = Sample(prompt_ids=[1], response_ids=[5], weight_version=3)
    assert check_staleness([a, b], trainer_version=3, bound=2) == {
        "rollout/weight_version_lag_max": 2, "rollout/weight_version_lag_mean": (2 + 1 + 0 + 0) / 4}
    with pytest.raises(RuntimeError, match="weight version 1 reached the trainer at version 3"):
        check_staleness([a, b], 3, 1)  # its newest token is fresh enough; its oldest is not


# ----------------------------------------------------------------------------------------------- carry mode
def _versioned(group, versions):
    for s, v in zip(group, versions):
        s.response_ids, s.rollout_logprobs = [7] * len(v), [-0.5] * len(v)
        s.response_text, s.finish_reason = f"#### {s.label if s.index < int(s.label) else -1}", "stop"
        s.weight_version, s.weight_versions = min(v), (list(v) if len(set(v)) > 1 else None)
    return group


class VersionedEngine(ScriptedEngine):
    """ScriptedEngine whose responses carry the engine's weight version when they were submitted."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.version = 0

    async def generate(self, group):
        version = self.version
        group = await super().generate(group)
        for s in group:
            s.weight_version = version
        return group


def _carry(buf, policy="drop", min_version=None):
    buf.carry, buf.stale_policy, buf.min_version = True, policy, min_version
    return buf


@pytest.mark.parametrize("policy", ["drop", "regenerate"])
def test_stale_policy_on_a_group_with_one_token_too_old(policy):
    # Two carried groups at a batch whose bound is version 1: A's first sample has one token of version 0 (stale,
    # though its newest is 2), B's tokens are all >= 1.
    engine = VersionedEngine()
    engine.version = 1
    buf, _ = make([2], B=2, engine=engine)
    _carry(buf, policy, min_version=1)
    a = _versioned(buf._new_group(buf.prompt_source.next_batch(1)[0]), [[0, 1, 1, 2]] + [[1] * 4] * (G - 1))
    b = _versioned(buf._new_group(buf.prompt_source.next_batch(1)[0]), [[1, 2, 2, 2]] + [[1] * 4] * (G - 1))
    buf.pending = [a, b]
    groups, m = asyncio.run(buf.collect(abort=engine.abort))
    assert m["rollout/stale_dropped"] == (policy == "drop") and m["rollout/stale_regenerated"] == (policy != "drop")
    assert a[0].metadata["stale"] and "stale" not in b[0].metadata
    if policy == "drop":  # a new prompt (row 2) takes A's place
        assert rows(groups) == [1, 2] and engine.submitted == [2] and groups[0] is b
    else:  # A's prompt generated again, same group id, fresh samples
        assert rows(groups) == [0, 1] and engine.submitted == [0] and groups[0] is not a and groups[1] is b
        assert groups[0][0].group_id == a[0].group_id and "stale" not in groups[0][0].metadata


def test_groups_in_flight_are_carried_not_aborted_and_judged_at_their_batch():
    # B = 2, four in flight; rows 2 and 3 are slow. Batch 1 (bound 0): rows 0 and 1; rows 2 and 3 keep generating.
    engine = VersionedEngine(ticks={0: 1, 1: 1, 2: 6, 3: 6, 4: 30, 5: 30})
    buf, _ = make([2], B=2, over_sampling_factor=2.0, engine=engine)
    _carry(buf, "drop", min_version=0)
    loop = asyncio.new_event_loop()
    try:
        first, m1 = loop.run_until_complete(buf.collect(abort=engine.abort))
        assert rows(first) == [0, 1] and m1["rollout/groups_in_flight"] == 2 and engine.abort_calls == 0
        state = buf.state_dict(ref=lambda g: pytest.fail("nothing is kept or completed yet"))
        assert [g[0]["metadata"]["row"] for g in state["in_flight"]] == [2, 3] and state["pending"] == []
        buf.min_version = engine.version = 1  # batch 2's bound, and the engines' weights from now on
        second, m2 = loop.run_until_complete(buf.collect(abort=engine.abort))
    finally:
        for task in buf.cancel_in_flight():
            task.cancel()
        loop.close()
    # rows 2 and 3 (version 0) finish first: stale, dropped; rows 4 and 5 (slow) were submitted at the start, rows 6
    # and 7 (fast) after the drops and fill the batch; 4 and 5 go on into the next batch
    assert m2["rollout/stale_dropped"] == 2 and engine.submitted == [0, 1, 2, 3, 4, 5, 6, 7]
    assert rows(second) == [6, 7] and m2["rollout/groups_in_flight"] == 2
    assert all(s.weight_version == 1 for g in second for s in g)


def test_groups_for_later_batches_fill_the_engines_during_a_batchs_tail():
    # B = 2 and the producer allows one more batch (2 groups): four in flight from the start, none aborted; rows 0
    # and 3 fill batch 1 (row 1 is slow: the long tail), rows 1 and 2 go on into batch 2
    engine = ScriptedEngine(ticks={0: 1, 1: 9, 2: 9, 3: 1})
    buf, _ = make([2], B=2, engine=engine)
    _carry(buf).extra_in_flight = lambda: 2
    loop = asyncio.new_event_loop()
    try:
        groups, m = loop.run_until_complete(buf.collect(abort=engine.abort))
        assert rows(groups) == [0, 3] and engine.submitted == [0, 1, 2, 3] and engine.abort_calls == 0
        assert m["rollout/groups_in_flight"] == 2 and m["rollout/prompts_consumed"] == 4
        buf.extra_in_flight = lambda: 0
        groups, m = loop.run_until_complete(buf.collect(abort=engine.abort))
        assert rows(groups) == [1, 2] and engine.submitted == [0, 1, 2, 3] and m["rollout/prompts_consumed"] == 0
    finally:
        loop.close()


def test_snapshot_saves_kept_completed_and_in_flight_and_a_resume_generates_the_in_flight_again():
    engine = ScriptedEngine(ticks={0: 1, 1: 8, 2: 8})
    buf, _ = make([2], B=3, engine=engine)
    _carry(buf)
    table = []

    def ref(group):
        table.append(copy.deepcopy([s.state_dict() for s in group]))
        return len(table) - 1

    async def run():
        task = asyncio.ensure_future(buf.collect(abort=engine.abort))
        while len(buf._kept) < 1:  # row 0 kept, rows 1 and 2 still generating
            await asyncio.sleep(0)
        state = buf.state_dict(ref)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return state

    state = asyncio.run(run())
    assert [table[i][0]["metadata"]["row"] for i in state["pending"]] == [0] and state["completed"] == []
    assert [g[0]["metadata"]["row"] for g in state["in_flight"]] == [1, 2]
    assert all(s["response_ids"] == [] for g in state["in_flight"] for s in g)  # prompts only: generated again
    resumed, engine2 = make([2], B=3)
    _carry(resumed)
    resumed.load_state_dict(json.loads(json.dumps(state)), [[Sample.from_state_dict(s) for s in g] for g in table])
    groups, m = asyncio.run(resumed.collect(abort=engine2.abort))
    assert rows(groups) == [0, 1, 2] and engine2.submitted == [1, 2] and resumed.prompt_source.position == 3
    assert [g[0].group_id for g in groups] == [0, 1, 2] and resumed.next_group_id == 3


# ----------------------------------------------------------------------------------------------- the producer
class _Buffer:
    def __init__(self):
        self.carry, self.min_version, self.stale_policy, self.mins = False, None, "drop", []
        self.cfg = type("C", (), {"rollout_batch_size": 4})()

    def state_dict(self, ref=None):
        return {"min_version": self.min_version}

    def cancel_in_flight(self):
        return []


class _Stage:
    """A rollout stage whose acollect() records which batch it started and the weights it started with."""

    def __init__(self):
        self.loop, self.step, self.buffer = asyncio.new_event_loop(), 0, _Buffer()
        self.backend = type("B", (), {"version": WeightVersion(0)})()
        self.client, self.restored, self.record_generated, self.generated_tokens = None, {}, False, 0
        self.started = []

    async def acollect(self):
        self.started.append((self.step, self.backend.version.value, self.buffer.min_version))
        await asyncio.sleep(0)
        version = self.backend.version.value
        self.step += 1
        return [[Sample(prompt_ids=[1], response_ids=[2], weight_version=version)]], {"rollout/n": self.step}


def test_producer_runs_at_most_k_batches_ahead_of_the_trainer():
    stage = _Stage()
    producer = RolloutProducer(stage, async_steps=2)
    try:
        wait_until(lambda: len(producer._ready) >= 2, "two batches ahead", WAIT_S)
        # the snapshot runs on the producer's loop: had the gate let batch 2 start, it would have started already
        assert producer.state_dict()["step"] == 2 and [s[0] for s in stage.started] == [0, 1]
        groups, m = producer.next()  # the trainer takes batch 0 (step 0, version 0): batch 2 may start
        assert m["rollout/n"] == 1 and m["rollout/weight_version_lag_max"] == 0
        wait_until(lambda: len(stage.started) == 3, "batch 2 started", WAIT_S)
        producer.state_dict()
        assert stage.started[2] == (2, 0, 0) and len(stage.started) == 3  # bound of batch 2: version 2 - 2
        stage.backend.version.set(1)  # step 0's update
        producer.next()
        stage.backend.version.set(2)
        groups, m = producer.next()  # batch 2, generated with version 0, trained at version 2: two behind
        assert groups[0][0].weight_version == 0 and m["rollout/weight_version_lag_max"] == 2
        assert m["rollout/partial_fraction"] == 0.0
    finally:
        producer.close()
    assert not producer._thread.is_alive()
    # the gate's room beyond the batch under way, in groups (B = 4): the trainer waits for batch 2 -> one batch more
    stage.step, producer._taken = 2, 2
    assert producer._lookahead() == 4
    stage.step, producer._taken = 2, 1
    assert producer._lookahead() == 0


class _Client:
    def __init__(self):
        self.calls, self.sync_pause_mode = [], "abort"

    async def pause_generation(self, mode="abort"):
        self.calls.append(("pause", mode))

    async def continue_generation(self):
        self.calls.append(("continue",))


@pytest.mark.parametrize("partial", [False, True])
def test_partial_rollout_pauses_in_retract_mode_around_the_sync_and_counts_responses_that_crossed_it(partial):
    stage = _Stage()
    stage.client = _Client()
    producer = RolloutProducer(stage, async_steps=2, partial_rollout=partial)
    try:
        with producer.weight_update():
            stage.client.calls.append(("sync",))
        assert stage.client.calls == ([("pause", "retract"), ("sync",), ("continue",)] if partial else [("sync",)])
        assert stage.client.sync_pause_mode == ("retract" if partial else "abort")  # SGLang's update sessions
        wait_until(lambda: len(producer._ready) >= 2, "two batches ahead", WAIT_S)
        groups = producer._ready[0][0]  # the producer is at its gate: the batch is the test's to change
        groups[0][0].response_ids, groups[0][0].weight_versions = [2, 3], [0, 1]  # one response crossed an update
        groups[0].append(Sample(prompt_ids=[1], response_ids=[2], weight_version=0))
        stage.backend.version.set(1)
        groups, m = producer.next()
        assert m["rollout/partial_fraction"] == 0.5
        assert m["rollout/weight_version_lag_max"] == 1 and m["rollout/weight_version_lag_mean"] == (1 + 0 + 1) / 3
    finally:
        producer.close()


# ----------------------------------------------------------------------------------------------- partial rollouts
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_hf_model(tmp_path_factory.mktemp("partial") / "hf", "qwen2.5", seed=0)


def _held_across_an_update(tiny, new, mode):
    """One request: two tokens, then held; paused (`mode`), `new`'s weights pushed as version 1, continued."""
    engine = Engine(tiny, max_batch_size=4, seed=0)
    try:
        engine.hold(steps=1)  # prefill (1 token) and one decode (2 tokens), then held mid-generation
        fut = engine.submit(PROMPT, {"max_new_tokens": 6, "ignore_eos": True, "temperature": 1.0, "sampling_seed": 3})
        held(engine)
        engine.pause_generation(mode)
        engine.update_weights_from_tensor([(n, p.detach().clone()) for n, p in new.named_parameters()],
                                          weight_version=1)  # paused: applies at once, the request stays
        engine.continue_generation()
        engine.release()
        return engine, result(fut, "the request held across the update", WAIT_S)[0]
    finally:
        engine.release()
        engine.shutdown()


PROMPT = [5, 6, 7]


@pytest.mark.parametrize("mode", ["retract", "in_place"])
def test_partial_rollout_tokens_keep_the_version_and_the_logprobs_that_sampled_them(tiny, mode):
    """A request held across a weight update (paused, as at a partial-rollout sync): its first two tokens are version
    0 with the old weights' log-probs, the rest version 1. retract (SGLang's, what rollout.partial_rollout uses)
    recomputes the KV cache, so those are the new weights' log-probs over the whole prefix, as a teacher-forced
    forward of the new model gives them; in_place keeps the old cache, and they are not."""
    old, new = hf_model(tiny), hf_model(tiny)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    engine, out = _held_across_an_update(tiny, new, mode)
    meta = out["meta_info"]
    assert meta["weight_versions"] == [{"version": "0", "start": 0, "end": 2}, {"version": "1", "start": 2, "end": 6}]
    assert meta["weight_version"] == 1  # SGLang's: the newest
    response, logprobs = out["output_ids"], torch.tensor([t[0] for t in meta["output_token_logprobs"]])
    before, after = (teacher_forced_logprobs(m, PROMPT, response, 1.0) for m in (old, new))
    assert torch.allclose(logprobs[:2], before[:2], atol=1e-4)
    assert (before - after).abs().min() > 1e-3  # the two versions' log-probs differ: the test can tell them apart
    if mode == "retract":
        assert torch.allclose(logprobs[2:], after[2:], atol=1e-4)
    else:
        assert (logprobs[2:] - after[2:]).abs().max() > 1e-3
    sample = Sample(prompt_ids=PROMPT)
    RolloutClient(engine=engine, weight_version=WeightVersion(1))._fill(sample, out)
    assert sample.weight_versions == [0, 0, 1, 1, 1, 1] and sample.weight_version == 0  # the oldest token's
    assert sample.rollout_logprobs == logprobs.tolist() and sample.response_ids == response


# ----------------------------------------------------------------------------------------------- kill and resume
def _completed_rows(run_dir, ckpt):
    """Dataset rows of every group generated to completion (kept or dropped), by group id (a group carried to a
    later step is in two steps' dumps): the dumps' records, plus the completed groups the final checkpoint holds
    (not yet dumped); and the rows the checkpoint has in flight."""
    rows = {}
    for path in sorted((run_dir / "rollouts").glob("step_*.jsonl.gz")):
        with gzip.open(path, "rt") as f:
            rows.update((r["group_id"], r["prompt_index"]) for r in map(json.loads, f)
                        if r["drop_reason"] != "aborted" and r["padded_from_group"] is None)
    state = json.loads((ckpt / "trainer_state.json").read_text())["rollout"]
    table = state["groups"]
    rows.update((table[g][0]["group_id"], table[g][0]["metadata"]["row"]) for gen in state["generated"] for g in gen)
    done = collections.Counter(rows.values())
    in_flight = collections.Counter(g[0]["metadata"]["row"] for g in state["buffer"]["in_flight"])
    return done, in_flight, state


@pytest.mark.dist
def test_kill_and_resume_generates_every_prompt_exactly_once(toy, tmp_path):  # noqa: F811
    """k = 2 with partial rollouts, 8 prompts in flight for 4 kept: SIGKILL mid-step 3 (checkpoint at step 2, taken
    while the producer runs ahead: finished batches, groups kept or completed, prompts in flight, whichever the moment
    holds), resume, finish 5 steps. Every prompt the sampler handed out is generated to completion once, or is in
    flight at the end (the final checkpoint says which). With the buffered batches not saved it fails (tried)."""
    run = tmp_path / "run"
    extra = ["rollout.async_steps=2", "rollout.partial_rollout=true", "dynamic_sampling.enable=true",
             "dynamic_sampling.over_sampling_factor=2", "trainer.dump_rollouts=1"]
    rc = _train(_args(toy, run, 5, extra=extra), env={"DAPO_FAULT": "train@3"}, check=False)
    assert rc != 0 and (run / "checkpoints" / "latest").read_text().strip() == "iter_0000002"
    saved = json.loads((run / "checkpoints" / "iter_0000002" / "trainer_state.json").read_text())["rollout"]
    _train(_args(toy, run, 5, extra=[*extra, f"trainer.load={run / 'checkpoints'}"]))
    assert [r["step"] for r in _metrics(run)][-3:] == [3, 4, 5]
    done, in_flight, state = _completed_rows(run, run / "checkpoints" / "iter_0000005")
    position = state["buffer"]["prompt_source"]
    sampler = EpochSampler(position["num_items"], seed=position["seed"])
    handed_out = collections.Counter(sampler.next_indices(position["epoch"] * position["num_items"]
                                                          + position["position"]))
    assert done + in_flight == handed_out, (done + in_flight - handed_out, handed_out - done - in_flight)
    assert max(r["rollout/weight_version_lag_max"] for r in _metrics(run)) <= 2
    print("the step-2 checkpoint held", len(saved["ready"]), "batches ahead,", len(saved["buffer"]["in_flight"]),
          "groups in flight and", len(saved["buffer"]["pending"]), "kept groups of the batch under way")


def test_a_rollout_error_reaches_the_trainer_as_it_was():
    class Failing(_Stage):
        async def acollect(self):
            raise ValueError("the server rejected the request")

    producer = RolloutProducer(Failing(), async_steps=2)
    try:
        with pytest.raises(ValueError, match="the server rejected the request"):
            producer.next()
    finally:
        producer.close()


def test_a_multi_turn_response_keeps_each_turns_versions_per_token(tok):  # noqa: F811
    """Turns sampled by versions 4, 5, 5 (a weight update between turns, as with k >= 2): the model's tokens keep
    theirs, a tool's tokens take the model's before them; the sample's weight_version is the oldest."""
    prompt = chars(tok, "Q")
    call = chars(tok, "```calculator\n1+1\n```\n")
    s = run(fenced_runner(tok), TurnFleet(prompt, [call, call, chars(tok, "ab")], versions=[4, 5, 5]), prompt, n=1)[0]
    assert s.weight_version == 4 and len(s.weight_versions) == len(s.response_ids)
    first_model = s.metadata["turns"][1]["start"]  # the first tool result starts where the first turn ends
    second_model = s.metadata["turns"][2]["start"]
    assert s.weight_versions == [4] * second_model + [5] * (len(s.response_ids) - second_model)
    assert first_model == len(call)


def test_a_k2_checkpoint_resumed_with_k1_trains_its_finished_batches_first():
    stage = _Stage()
    a, b, c = ([Sample(prompt_ids=[i])] for i in range(3))
    stage.buffer.pending = [c]
    stage.restored = {"groups": [a, b], "ready": [{"groups": [1], "metrics": {}, "seconds": 0.0},
                                                  {"groups": [0], "metrics": {}, "seconds": 0.0}]}
    RolloutAhead(stage, async_steps=1, staleness_bound=1)
    assert stage.buffer.pending == [b, a, c]
