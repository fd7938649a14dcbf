"""Partial rollouts (rollout.partial_rollout, async_steps >= 2) against the real PyPI sglang server on CPU: requests
paused with `retract` across a weight update continue with the new weights, and our client gives every token the
version that sampled it, with its log-prob under that version (SGLang recomputes the retracted requests' KV cache,
so the tokens after the update are the new model's over the whole prefix).

One server for the module (~40 s to start on 2 cores). Needs tools/.venv-sglang (bash tools/setup_sglang_cpu.sh,
run by .ci/run); skipped with that message otherwise. Every wait is bounded.
"""
import asyncio
import json

import pytest
import torch

from dapo_megatron.models.tiny import make_tiny_hf_model
from dapo_megatron.rollout.client import run_sync
from dapo_megatron.types import Sample
from tests.sglang_real import needs_server_venv
from tests.test_sglang_cpu_server import PROMPT, client_of, hf_model, trainer_logprobs, wait_running
from tests.test_sglang_cpu_server import model_dir, servers  # noqa: F401 (module fixtures: a server of its own)
from tests.test_sglang_cpu_train import train

pytestmark = [pytest.mark.sglang_cpu, needs_server_venv]
NEW_TOKENS = 160  # long enough that both requests are still decoding when the update comes


def test_retract_update_continue_gives_each_token_its_version_and_logprob(servers, model_dir, tmp_path):
    client = client_of(servers)
    client.sync_pause_mode = "retract"  # what RolloutProducer sets with rollout.partial_rollout
    old, new = hf_model(model_dir), hf_model(model_dir)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    new.save_pretrained(tmp_path / "v1")

    async def go():
        samples = [Sample(prompt_ids=PROMPT, group_id=g) for g in range(2)]
        tasks = [asyncio.create_task(client.generate_group([s], {"max_new_tokens": NEW_TOKENS, "ignore_eos": True,
                                                                 "temperature": 1.0}))
                 for s in samples]
        await wait_running(servers, 2)
        await client.pause_generation(client.sync_pause_mode)  # RolloutProducer.weight_update
        await client.update_weights_from_disk(str(tmp_path / "v1"), weight_version=1)
        await client.continue_generation()
        await asyncio.wait_for(asyncio.gather(*tasks), 300)
        return samples

    for s in run_sync(go()):
        assert s.finish_reason == "length" and len(s.response_ids) == len(s.rollout_logprobs) == NEW_TOKENS
        assert s.weight_versions is not None and s.weight_version == 0  # the oldest token's ("default" = 0)
        cut = s.weight_versions.index(1)
        assert 0 < cut < NEW_TOKENS and s.weight_versions == [0] * cut + [1] * (NEW_TOKENS - cut)
        before = trainer_logprobs(old, s.prompt_ids, s.response_ids)
        after = trainer_logprobs(new, s.prompt_ids, s.response_ids)
        assert max(abs(a - b) for a, b in zip(s.rollout_logprobs[:cut], before[:cut])) < 1e-4
        assert max(abs(a - b) for a, b in zip(s.rollout_logprobs[cut:], after[cut:])) < 1e-4
        assert max(abs(a - b) for a, b in zip(before, after)) > 1e-2  # the two versions can be told apart


def test_train_k2_with_partial_rollouts_on_real_sglang(tmp_path):
    """`dapo-megatron train` at rollout.async_steps=2 with partial rollouts: the producer generates while disk
    weight syncs happen (pause retract, update, continue), without a hang, every token within 2 versions."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"question": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                            for a in range(5) for b in range(5)))
    toy = make_tiny_hf_model(tmp_path / "hf", "qwen2.5", seed=1), data
    rows = train(toy, tmp_path / "k2", "rollout.async_steps=2", "rollout.partial_rollout=true",
                 "rollout.max_response_length=24", "trainer.num_steps=4")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    lags = [r["rollout/weight_version_lag_max"] for r in rows]
    print("lags", lags, "partial fractions", [r["rollout/partial_fraction"] for r in rows])
    assert lags[0] == 0 and max(lags) <= 2, lags
    assert all(0.0 <= r["rollout/partial_fraction"] <= 1.0 and r["rollout/stale_dropped"] >= 0 for r in rows)
    gaps = [r["rollout/train_infer_logprob_diff_max"] for r in rows]
    assert all(g < 1e-3 for g, lag in zip(gaps, lags) if lag == 0), gaps  # on-policy: SGLang served our weights
