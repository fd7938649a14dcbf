"""End to end at EP=2: two DAPO steps of a Qwen3-MoE policy through the CLI (embedded engine, megatron actor with
experts split over 2 ranks); the engine's log-probs equal the trainer's after every weight sync."""
import pytest

from dapo_megatron.models.tiny import make_tiny_hf_model
from test_trainer import _args, _metrics, _train


@pytest.mark.dist
@pytest.mark.slow
def test_dapo_steps_at_ep2(tmp_path):
    import json

    hf = make_tiny_hf_model(tmp_path / "hf", "qwen3_moe", seed=1)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"question": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                            for a in range(5) for b in range(5)))
    run = tmp_path / "run"
    _train(_args((hf, data), run, steps=2, extra=["parallel.expert_model_parallel_size=2"]))
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["actor/grad_norm"] > 0
        assert r["rollout/train_infer_logprob_diff_max"] < 1e-4
    assert json.loads((run / "config.json").read_text())["parallel"]["expert_model_parallel_size"] == 2


@pytest.mark.dist
@pytest.mark.slow
def test_dapo_steps_at_ep2_with_r3(tmp_path):
    """R3: the engine's routed experts travel with the samples to both EP ranks and are replayed in the old-log-prob
    pass and the update; trainer and engine log-probs agree (< 1e-4) and the MoE metrics are logged."""
    import json

    hf = make_tiny_hf_model(tmp_path / "hf", "qwen3_moe", seed=1)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"question": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                            for a in range(5) for b in range(5)))
    run = tmp_path / "run"
    _train(_args((hf, data), run, steps=2, extra=["parallel.expert_model_parallel_size=2",
                                                  "actor.routing_replay=r3"]))
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["actor/grad_norm"] > 0
        assert r["rollout/train_infer_logprob_diff_max"] < 1e-4
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["actor"]["routing_replay"] == "r3" and cfg["rollout"]["return_routed_experts"] is True
