"""Routing replay (actor.routing_replay: none | r2 | r3): token layouts and gate probabilities against hand numbers,
the engine's routed experts against HF's own routing, and replay in the actor at EP=2 and PP=2 x EP=2 (gloo)."""
from pathlib import Path

import pytest
import torch

from dapo_megatron.models.tiny import make_tiny_hf_model
from dapo_megatron.train import routing_replay as rr

REPO = Path(__file__).resolve().parents[1]
REPLAY = REPO / "tests" / "dist_scripts" / "moe_replay.py"


def test_token_owners_packed_and_padded():
    owner, pos = rr.token_owners([3, 2], packed=True, width=8)
    assert owner.tolist() == [0, 0, 0, 1, 1, -1, -1, -1] and pos.tolist() == [0, 1, 2, 0, 1, -1, -1, -1]
    owner, pos = rr.token_owners([3, 1], packed=False, width=3)  # [S, B] flattened s-major: s * B + b
    assert owner.tolist() == [0, 1, 0, -1, 0, -1] and pos.tolist() == [0, 0, 1, -1, 2, -1]


def test_layout_indices_fill_and_shard():
    owner, pos = rr.token_owners([3, 2], packed=True, width=6)
    a = torch.tensor([[5, 1], [2, 3], [4, 0]])  # sample 0: all 3 tokens
    b = torch.tensor([[7, 6]])  # sample 1: 1 of its 2 tokens recorded (the engine never feeds the last)
    got = rr.layout_indices([a, b], owner, pos, topk=2)
    assert got.tolist() == [[5, 1], [2, 3], [4, 0], [7, 6], [0, 1], [0, 1]]
    dense = torch.tensor([[-1, -1], [2, 3], [-1, -1]])  # -1 rows (unknown) keep the default
    assert rr.layout_indices([dense, None], owner, pos, 2)[:3].tolist() == [[0, 1], [2, 3], [0, 1]]
    assert rr.sequence_shard(got, 2, 1).tolist() == [[7, 6], [0, 1], [0, 1]]


def test_routed_experts_codec_round_trip():
    t = torch.arange(24, dtype=torch.int32).reshape(3, 4, 2)
    assert torch.equal(rr.decode_routed_experts(rr.encode_routed_experts(t), 4, 2), t)


@pytest.mark.parametrize("pre_softmax", [False, True])
def test_replayed_gate_probs_are_recomputed_at_the_given_experts(pre_softmax):
    """megatron's RouterReplay (REPLAY_FORWARD): the top-k is forced, probabilities come from the current logits."""
    import math

    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]], requires_grad=True)
    replay = RouterReplay()
    try:
        replay.set_target_indices(torch.tensor([[3, 1]]))  # not the top-2 (that is 0, 1)
        replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
        probs, routing_map = topk_routing_with_score_function(logits, 2, use_pre_softmax=pre_softmax,
                                                              router_replay=replay)
    finally:
        RouterReplay.global_router_replay_instances.remove(replay)
    assert routing_map.tolist() == [[False, True, False, True]]
    e = [math.exp(x) for x in (2.0, 1.0, 0.0, -1.0)]
    if pre_softmax:  # softmax over all experts, no renormalisation (norm_topk_prob=False)
        want = [0.0, e[1] / sum(e), 0.0, e[3] / sum(e)]
    else:  # softmax over the k replayed logits (norm_topk_prob=True): e^1 / (e^1 + e^-1)
        want = [0.0, e[1] / (e[1] + e[3]), 0.0, e[3] / (e[1] + e[3])]
    assert probs.detach()[0].tolist() == pytest.approx(want, abs=1e-6)
    probs[0, 3].backward()
    assert logits.grad.abs().sum() > 0  # the router still gets a gradient


def _engine_samples(hf_dir, n_prompts=4, n=2, seed=0):
    """Responses of the embedded engine with their routed experts (as the client stores them on a Sample)."""
    import random

    from dapo_megatron.rollout.engine import Engine

    rng = random.Random(seed)
    engine = Engine(hf_dir, seed=seed)
    try:
        rows = []
        for _ in range(n_prompts):
            prompt = [rng.randrange(1, 120) for _ in range(rng.randrange(3, 9))]
            for o in engine.generate_sync(prompt, {"n": n, "max_new_tokens": 8, "temperature": 1.0,
                                                   "ignore_eos": True}, return_routed_experts=True):
                rows.append({"prompt_ids": prompt, "response_ids": o["output_ids"],
                             "rollout_logprobs": [lp for lp, *_ in o["meta_info"]["output_token_logprobs"]],
                             "routed_experts": o["meta_info"]["routed_experts"]})
        return rows
    finally:
        engine.shutdown()


def test_engine_routed_experts_equal_hf_routing(tmp_path):
    """The engine's per-token experts (prefill + decode pieces) equal HF's routing of the whole sequence at once."""
    from transformers import AutoModelForCausalLM

    from dapo_megatron.rollout.routed_experts import RoutingRecorder

    hf_dir = make_tiny_hf_model(tmp_path / "hf", "qwen3_moe", seed=1)
    rows = _engine_samples(hf_dir, n_prompts=2)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    rec = RoutingRecorder(model)
    for r in rows:
        ids = r["prompt_ids"] + r["response_ids"]
        got = rr.decode_routed_experts(r["routed_experts"], 4, 2)
        assert got.shape == (len(ids) - 1, 4, 2)
        with torch.no_grad():
            model(torch.tensor([ids[:-1]]))
        ref = rec.take(len(ids) - 1)
        assert (got[:, 1] == -1).all()  # layer 1 is dense (mlp_only_layers)
        assert torch.equal(got.sort(-1).values, ref.sort(-1).values)


@pytest.mark.dist
@pytest.mark.slow  # three actor runs: ~85 s (ep2) on an idle 2-core machine
@pytest.mark.parametrize("tp, pp, ep, nproc", [(1, 1, 2, 2), (1, 2, 2, 4), (2, 1, 2, 2)],
                         ids=["ep2", "pp2-ep2", "tp2-ep2"])
def test_routing_replay_in_the_actor(torchrun, tmp_path, tp, pp, ep, nproc):
    """r3: the old-log-prob pass routes every token as the engine did (read back from megatron's routing maps);
    r2: after the routers moved, the update still routes every token as the old-log-prob pass did (none: not).
    TP=2 x EP=2 (expert TP 1): sequence parallel, each TP rank replays its shard of the tokens."""
    hf_dir = make_tiny_hf_model(tmp_path / "hf", "qwen3_moe", seed=1)
    torch.save(_engine_samples(hf_dir), tmp_path / "samples.pt")
    got = {}
    for mode in ("none", "r2", "r3"):
        torchrun(REPLAY, nproc, hf_dir, tp, pp, ep, mode, tmp_path / "samples.pt", tmp_path / f"{mode}.pt")
        got[mode] = torch.load(tmp_path / f"{mode}.pt")
    assert got["r3"]["replay_checked"] > 0 and got["r3"]["replay_mismatch"] == 0
    assert got["r3"]["old_vs_engine"] < 1e-4 and got["r3"]["engine_route_flips"] == 0
    assert got["r3"]["engine_route_tokens"] > 0
    assert got["r2"]["replay_checked"] > 0 and got["r2"]["replay_mismatch"] == 0
    assert got["r2"]["update_tokens"] > 0 and got["r2"]["update_changed"] == 0
    assert got["none"]["update_changed"] > 0  # the perturbation does change the routing without replay


def test_moe_load_metrics_hand_count():
    """Known routing of 4 tokens, top-2 over 4 experts: tokens per expert [3, 3, 2, 0] (mean 2): max/mean 1.5;
    with a capacity of 2 per expert, one assignment of expert 0 and one of expert 1 are dropped."""
    from dapo_megatron.train.moe_metrics import MoEStats, expert_load_metrics

    stats = MoEStats.__new__(MoEStats)
    stats.routers, stats.num_experts, stats.topk, stats.capacity = [(2, None)], 4, 2, 1.0
    stats._reset()
    stats.collecting = True
    full = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 1, 0]], dtype=torch.bool)
    stats._hook(2)(None, None, (None, full))
    assert stats.counts[2].tolist() == [3, 3, 2, 0] and stats.dropped == 0
    kept = full.clone()
    kept[2, 0] = kept[3, 1] = False  # the capacity drops 2 of the 8 assignments
    stats._hook(2)(None, None, (None, kept))
    assert stats.counts[2].tolist() == [5, 5, 4, 0] and stats.dropped == 2  # + [2, 2, 2, 0]
    m = expert_load_metrics({2: torch.tensor([3.0, 3.0, 2.0, 0.0])}, dropped=2)
    assert m == {"moe/load_max_over_mean/layer_2": 1.5, "moe/dropped_tokens": 2.0}
    assert "moe/dropped_tokens" not in expert_load_metrics({0: torch.ones(4)}, None)  # drop-less: not logged


@pytest.mark.parametrize("family, override, message", [
    ("qwen2.5", ["actor.routing_replay=r3"], "actor.routing_replay=r3 replays MoE routing; model.path="),
    ("qwen2.5", ["actor.routing_replay=r2"], "has no experts: set actor.routing_replay=none"),
    ("qwen3_moe", ["actor.routing_replay=r4"], "actor.routing_replay='r4'; use one of none, r2, r3"),
    ("qwen3_moe", ["actor.routing_replay=r2", "actor.recompute_old_logprobs=false"],
     "actor.routing_replay=r2 replays the routing of the old-log-prob pass"),
    ("qwen3_moe", ["actor.routing_replay=r3", "actor.recompute_granularity=full", "actor.recompute_method=uniform",
                   "actor.recompute_num_layers=1"], "routing_replay with actor.recompute_granularity=full"),
    ("qwen3_moe", ["rollout.return_routed_experts=true"], "rollout.return_routed_experts is set by"),
])
def test_routing_replay_settings_are_refused_in_one_line(tmp_path, family, override, message):
    from dapo_megatron.config import ConfigError, load_config

    hf = make_tiny_hf_model(tmp_path / "hf", family)
    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "1+1=", "answer": "2"}\n')
    base = [f"model.path={hf}", f"data.path={data}", "rollout.rollout_batch_size=4", "rollout.n_samples_per_prompt=4",
            "actor.global_batch_size=8", "actor.micro_batch_size=2"]
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(None, [*base, *override], world_size=1)
    cfg = load_config(None, [*base, "actor.routing_replay=r3"], world_size=1) if family == "qwen3_moe" else None
    assert cfg is None or cfg.rollout.return_routed_experts is True  # r3 asks the engines for their routing


def test_sglang_launcher_asks_for_routed_experts():
    from dapo_megatron.rollout.sglang_launcher import SGLangServers

    assert "--enable-return-routed-experts" in SGLangServers("/m", enable_return_routed_experts=True).server_command(0)
    assert "--enable-return-routed-experts" not in SGLangServers("/m").server_command(0)


@pytest.mark.dist
def test_broadcast_samples_carries_routed_experts(torchrun, tmp_path):
    torchrun(REPO / "tests" / "dist_scripts" / "broadcast_routed.py", 2, tmp_path / "got.pt")
    (p0, r0, e0), (p1, r1, e1) = torch.load(tmp_path / "got.pt")
    assert (p0, r0, p1, r1, e1) == ([1, 2, 3], [4, 5, 6], [7], [8], None)
    want = torch.arange(5 * 4 * 2, dtype=torch.int32).reshape(5, 4, 2)
    assert torch.equal(rr.decode_routed_experts(e0, 4, 2), want)
