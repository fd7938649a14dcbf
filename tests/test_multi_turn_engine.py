"""Multi-turn rollouts on the real embedded engine, through RolloutClient (the code the http backend runs too): every
model token's engine log-prob equals a teacher-forced forward over prompt + the whole response (model and tool tokens,
as the trainer sees it), and the response is the engine's ids plus the tool ids, token for token."""
import asyncio
import re

import pytest
import torch

from dapo_megatron.models.tiny import make_tiny_hf_model
from dapo_megatron.rollout.client import RolloutClient
from dapo_megatron.rollout.engine import Engine
from dapo_megatron.rollout.multi_turn import MultiTurnConfig, MultiTurnRunner
from dapo_megatron.rollout.protocol import GenerationParams
from dapo_megatron.rollout.server import launch_embedded_server
from dapo_megatron.rollout.tools.formats import FORMATS, ToolCall
from dapo_megatron.types import Sample


class OperatorFormat:
    """A call format a random tiny model hits often: any operator character ends a turn and calls the calculator
    with the turn's digits (the last one) squared."""
    name = "operator"
    stop = ("+", "-", "*", "/", "=")

    def parse(self, text, tool_args):
        if not text or text[-1] not in "+-*/=":
            return None
        digits = re.findall(r"\d", text)
        return ToolCall("calculator", {"expression": f"{digits[-1] if digits else 0}**2"})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_hf_model(tmp_path_factory.mktemp("mt_engine") / "qwen", family="qwen2.5", seed=0)


@pytest.mark.parametrize("transport", ["inprocess", "http"])
def test_model_token_logprobs_match_a_teacher_forced_forward_of_the_whole_response(model_dir, monkeypatch, transport):
    """Through RolloutClient(engine=...) (the embedded backend) and over HTTP to the embedded server (the http
    backend's path, SGLang's API)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setitem(FORMATS, "operator", OperatorFormat)
    tok = AutoTokenizer.from_pretrained(model_dir)
    runner = MultiTurnRunner(MultiTurnConfig(enabled=True, format="operator", max_turns=4), tok)
    engine = Engine(model_dir, max_batch_size=8, seed=0)
    server = launch_embedded_server(model_dir, 0, engine=engine) if transport == "http" else None
    client = RolloutClient([server.url]) if server else RolloutClient(engine=engine)
    prompt = tok.encode("<|im_start|>user\n12*34<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    group = [Sample(prompt_ids=list(prompt), group_id=0, index=i) for i in range(6)]
    try:
        asyncio.run(runner.generate_group(client, group, GenerationParams(temperature=1.0, max_tokens=96, seed=5)))
    finally:
        asyncio.run(client.close())
        if server:
            server.shutdown()
        engine.shutdown()
    calls = [s.metadata["multi_turn"]["tool_calls"] for s in group]
    assert sum(calls) >= 3 and max(calls) >= 2, calls  # seeded: the loop really went round
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for s in group:
        mask = torch.tensor(s.loss_mask, dtype=torch.bool)
        assert len(s.response_ids) == len(s.rollout_logprobs) == len(mask) <= 96
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(s.prompt_ids) - 1:-1].float()
        trainer = torch.log_softmax(logits, -1).gather(1, torch.tensor(s.response_ids)[:, None])[:, 0]
        engine_lp = torch.tensor(s.rollout_logprobs)
        assert (trainer - engine_lp)[mask].abs().max().item() < 1e-4
        assert (engine_lp[~mask] == 0).all()
        # The tool segments are exactly the rendered tool messages' ids, between the engine's turns.
        tool_ids = [t for t, m in zip(s.response_ids, s.loss_mask) if not m]
        results = re.findall(r"tool(\d+)", tok.decode(tool_ids))
        assert len(results) == s.metadata["multi_turn"]["tool_calls"]
        assert tool_ids == [t for r in results for t in runner.renderer.ids(r)]
