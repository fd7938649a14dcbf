"""End to end: DAPO steps with rollout.multi_turn (embedded engine, megatron actor over gloo). The trainer's log-prob of
every model token equals the engine's (the gap counts loss tokens; tool tokens are in the sequence the trainer
reads), the tool metrics are logged, and eval's avg@k runs the same tools.

Run as a script (one rank), this file adds a call format a random tiny model hits often, then runs `dapo-megatron
train` with it (the built-in formats need a model that learned them)."""
import json
import sys
from pathlib import Path

import pytest

from tests.test_multi_turn_engine import OperatorFormat

KEYS = ("rollout/tool_calls_mean", "rollout/turns_mean", "rollout/tool_error_frac", "rollout/tool_timeout_frac",
        "rollout/tool_using_frac", "time/tool_s")


@pytest.mark.dist
@pytest.mark.slow  # ~1 min each on 2 busy cores
@pytest.mark.parametrize("extra", [["dynamic_sampling.enable=false"],
                                   ["dynamic_sampling.enable=true", "rollout.async_steps=1"]], ids=["sync", "async_ds"])
def test_dapo_steps_with_tool_calls(tmp_path, torchrun, extra):
    """Also with dynamic sampling (groups filtered and aborted while tools run) and the next step's rollout running
    while this step trains (rollout.async_steps=1)."""
    from dapo_megatron.models.tiny import make_tiny_hf_model

    hf = make_tiny_hf_model(tmp_path / "hf", "qwen2.5", seed=1)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"question": f"{a}*{b}", "answer": str(a * b)}) + "\n"
                            for a in range(4) for b in range(4)))
    run = tmp_path / "run"
    torchrun(Path(__file__), 1, f"model.path={hf}", f"data.path={data}", "data.template={question}",
             "data.apply_chat_template=false", f"trainer.run_dir={run}", "trainer.num_steps=2",
             "trainer.tensorboard=false", "rollout.rollout_batch_size=2", "rollout.n_samples_per_prompt=4",
             "rollout.max_response_length=24", "rollout.deterministic=true", *extra,
             "rollout.multi_turn.enabled=true", "rollout.multi_turn.format=operator", "rollout.multi_turn.max_turns=3",
             "reward.num_workers=0", "reward.type=python:tests.helpers.toy_reward.even_length",
             f"eval.path={data}", "eval.n_samples=2", "eval.max_prompts=3", "trainer.eval_interval=2",
             "actor.global_batch_size=8", "actor.micro_batch_size=4", timeout=600)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert all(k in r for k in KEYS), sorted(r)
        assert r["rollout/tool_calls_mean"] > 0 and r["rollout/turns_mean"] > 1
        if r["rollout/weight_version_lag_max"] == 0:  # async: a lagging batch's gap is the update (by design)
            assert r["rollout/train_infer_logprob_diff_max"] < 1e-4
        assert r["actor/grad_norm"] > 0
    assert "eval/avg@2" in rows[1]
    lags = [r["rollout/weight_version_lag_max"] for r in rows]
    assert lags == ([0, 1] if "rollout.async_steps=1" in extra else [0, 0])


if __name__ == "__main__":
    from dapo_megatron.cli import main
    from dapo_megatron.rollout.tools.formats import FORMATS

    FORMATS["operator"] = OperatorFormat
    main(["train", *sys.argv[1:]])
