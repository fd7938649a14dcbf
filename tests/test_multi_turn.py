"""Multi-turn rollouts (rollout/multi_turn.py) through a scripted fleet: token-exact responses (no re-tokenization),
the loss mask and log-probs of tool tokens, the shared budget, max_turns, tool errors, aborts, versions, metrics."""
import asyncio
import dataclasses

import pytest

from dapo_megatron.models.tiny import toy_tokenizer
from dapo_megatron.rollout.multi_turn import MultiTurnConfig, MultiTurnRunner, ToolMessageRenderer, multi_turn_metrics
from dapo_megatron.rollout.protocol import GenerationParams
from dapo_megatron.types import Sample


@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer()


def chars(tok, text):
    """One id per character: what a char-level model samples (the toy vocabulary has every printable char)."""
    vocab = tok.get_vocab()
    return [vocab[c] for c in text]


class TurnFleet:
    """A fleet whose 'sampled' tokens are scripted: turn k (told apart by prompt length: turn 0 has the base prompt,
    each later turn a longer one) answers `turns[k]`, cut at the params' budget; the i-th token's log-prob is
    -(i + 1) / 100, so every value can be traced."""
    worker_urls = ["inprocess://scripted"]

    def __init__(self, base_prompt, turns, versions=None, abort_turn=None):
        self.turns, self.versions, self.abort_turn = turns, versions or [0] * len(turns), abort_turn
        self.lengths = [len(base_prompt)]
        self.calls = []  # (prompt_ids, params) of every request

    async def generate_group(self, samples, params):
        prompt = list(samples[0].prompt_ids)
        self.calls.append((prompt, params))
        if len(prompt) not in self.lengths:
            self.lengths.append(len(prompt))
        k = self.lengths.index(len(prompt))
        for s in samples:
            ids = list(self.turns[k])[:params.max_tokens]
            s.response_ids = ids
            s.rollout_logprobs = [-(i + 1) / 100 for i in range(len(ids))]
            s.finish_reason = ("abort" if k == self.abort_turn else
                               "length" if len(ids) < len(self.turns[k]) else "stop")
            s.weight_version = self.versions[k]
            s.response_text = "<text>"
        return samples


def run(runner, fleet, prompt, n=2, seed=7):
    group = [Sample(prompt_ids=list(prompt), group_id=3, index=i) for i in range(n)]
    params = GenerationParams(temperature=1.0, max_tokens=runner.test_budget, seed=seed)
    return asyncio.run(runner.generate_group(fleet, group, params))


def fenced_runner(tok, max_len=200, **kw):
    cfg = MultiTurnConfig(enabled=True, format="fenced", tools=["calculator"], **kw)
    return budgeted(MultiTurnRunner(cfg, tok), max_len)


def budgeted(runner, max_len):
    runner.test_budget = max_len  # the response budget run() passes as GenerationParams.max_tokens
    return runner


def test_response_is_sampled_ids_plus_tool_ids_token_for_token_not_retokenized(tok):
    """The model writes 'Answer:' one char at a time; re-tokenizing the text would merge it into one token (id 101)."""
    prompt = chars(tok, "Q: 123*45?\n")
    turn1 = chars(tok, "```calculator\n123*45\n```\n")
    turn2 = chars(tok, "Answer: 5535") + [tok.eos_token_id]
    fleet = TurnFleet(prompt, [turn1, turn2])
    runner = fenced_runner(tok)
    group = run(runner, fleet, prompt)
    tool_ids = runner.renderer.ids("5535")
    assert tok.decode(tool_ids) == "```output\n5535\n```\n"
    for s in group:
        assert s.response_ids == turn1 + tool_ids + turn2
        assert s.loss_mask == [1] * len(turn1) + [0] * len(tool_ids) + [1] * len(turn2)
        lp1 = [-(i + 1) / 100 for i in range(len(turn1))]
        lp2 = [-(i + 1) / 100 for i in range(len(turn2))]
        assert s.rollout_logprobs == lp1 + [0.0] * len(tool_ids) + lp2
        retok = tok.encode(tok.decode(s.response_ids), add_special_tokens=False)
        assert retok != s.response_ids and 101 in retok  # the guard: this tokenizer merges on re-encoding
        assert s.finish_reason == "stop" and s.metadata["multi_turn"]["tool_calls"] == 1
        assert "Answer: 5535" in s.response_text and "```output\n5535" in s.response_text
    # The second turn continued from the prompt + everything so far, as ids.
    assert fleet.calls[1][0] == prompt + turn1 + tool_ids
    # The turns, as spans of the response (rollout dumps carry them): model, tool, model.
    a, b = len(turn1), len(turn1) + len(tool_ids)
    assert group[0].metadata["turns"] == [
        {"source": "model", "start": 0, "end": a, "weight_version": 0},
        {"source": "tool", "start": a, "end": b, "tool": "calculator", "status": "ok"},
        {"source": "model", "start": b, "end": b + len(turn2), "weight_version": 0}]
    assert fleet.calls[0][1].stop == ("\n```\n",) and fleet.calls[1][1].stop == ("\n```\n",)


def test_hermes_tool_message_is_rendered_by_the_chat_template(tok):
    r = ToolMessageRenderer(tok, "hermes")
    # The toy template closes the assistant turn with <|im_end|>\n and renders a tool message as its own turn.
    assert r.text("42") == "<|im_end|>\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n"
    assert r.ids("42")[0] == tok.convert_tokens_to_ids("<|im_end|>")
    prompt = chars(tok, "Q")
    turn1 = chars(tok, '<tool_call>{"name": "calculator", "arguments": {"expression": "6*7"}}</tool_call>')
    turn2 = chars(tok, "42") + [tok.eos_token_id]
    runner = budgeted(MultiTurnRunner(MultiTurnConfig(enabled=True, format="hermes"), tok), 400)
    s = run(runner, TurnFleet(prompt, [turn1, turn2]), prompt, n=1)[0]
    assert s.response_ids == turn1 + r.ids("42") + turn2


def test_budget_counts_model_and_tool_tokens_and_a_tool_result_that_does_not_fit_is_cut(tok):
    prompt = chars(tok, "Q")
    turn1 = chars(tok, "```calculator\n2**200\n```\n")  # a 61-digit result
    turn2 = chars(tok, "x" * 50)
    tool_len = len(fenced_runner(tok).renderer.ids(str(2 ** 200)))
    # Room for the tool result and 10 more tokens: the second turn gets exactly what is left.
    budget = len(turn1) + tool_len + 10
    fleet = TurnFleet(prompt, [turn1, turn2])
    s = run(fenced_runner(tok, max_len=budget), fleet, prompt, n=1)[0]
    assert fleet.calls[1][1].max_tokens == 10
    assert len(s.response_ids) == budget and s.finish_reason == "length"
    # Not even the tool result fits: it is cut to the budget and the sample ends, with no further request.
    fleet = TurnFleet(prompt, [turn1, turn2])
    s = run(fenced_runner(tok, max_len=len(turn1) + 5), fleet, prompt, n=1)[0]
    assert len(fleet.calls) == 1 and len(s.response_ids) == len(turn1) + 5 and s.finish_reason == "length"
    assert s.loss_mask == [1] * len(turn1) + [0] * 5


def test_max_turns_counts_model_generations_and_the_last_call_is_not_run(tok):
    prompt = chars(tok, "Q")
    call = chars(tok, "```calculator\n1+1\n```\n")
    for max_turns, expect_calls in ((1, 0), (2, 1), (3, 2)):
        fleet = TurnFleet(prompt, [call] * 5)
        s = run(fenced_runner(tok, max_turns=max_turns), fleet, prompt, n=1)[0]
        assert len(fleet.calls) == max_turns
        assert s.metadata["multi_turn"]["tool_calls"] == expect_calls
        assert s.metadata["multi_turn"]["turns"] == max_turns


def test_errors_and_malformed_calls_go_back_to_the_model_and_are_counted(tok):
    prompt = chars(tok, "Q")
    bad = [chars(tok, "```calculator\n__import__('os')\n```\n"),
           chars(tok, "```nosuchtool\n1\n```\n"),
           chars(tok, "```calculator\n1/0\n```\n"),
           chars(tok, "done") + [tok.eos_token_id]]
    fleet = TurnFleet(prompt, bad)
    runner = fenced_runner(tok, max_len=1000, max_turns=4)
    s = run(runner, fleet, prompt, n=1)[0]
    text = tok.decode(s.response_ids)
    assert "```output\nError: only numbers" in text and "Error: unknown tool 'nosuchtool'" in text
    assert "Error: division by zero" in text
    assert s.metadata["multi_turn"]["tool_calls"] == 3 and s.metadata["multi_turn"]["tool_errors"] == 3
    m = multi_turn_metrics([s])
    assert m["rollout/tool_error_frac"] == 1.0 and m["rollout/turns_mean"] == 4


def test_hermes_malformed_json_is_an_error_message(tok):
    prompt = chars(tok, "Q")
    turns = [chars(tok, "<tool_call>{calculator 6*7}</tool_call>"), [tok.eos_token_id]]
    runner = budgeted(MultiTurnRunner(MultiTurnConfig(enabled=True, format="hermes"), tok), 400)
    s = run(runner, TurnFleet(prompt, turns), prompt, n=1)[0]
    assert "<|im_start|>tool\nError: malformed tool call: not JSON" in tok.decode(s.response_ids)
    assert s.metadata["multi_turn"]["tool_errors"] == 1


def test_abort_in_a_later_turn_aborts_the_sample_and_the_oldest_version_is_kept(tok):
    prompt = chars(tok, "Q")
    call = chars(tok, "```calculator\n1+1\n```\n")
    fleet = TurnFleet(prompt, [call, call, chars(tok, "ab")], versions=[4, 5, 5], abort_turn=2)
    s = run(fenced_runner(tok), fleet, prompt, n=1)[0]
    assert s.finish_reason == "abort" and s.weight_version == 4


def test_turn_seeds_are_derived_from_the_group_seed(tok):
    prompt = chars(tok, "Q")
    call = chars(tok, "```calculator\n1+1\n```\n")
    seeds = []
    for _ in range(2):
        fleet = TurnFleet(prompt, [call, call, [tok.eos_token_id]])
        run(fenced_runner(tok), fleet, prompt, n=2, seed=11)
        # the first call serves the whole group; the later ones come in whichever order the samples' tool calls
        # finish (a thread pool), so they are compared sorted: each sample's turn seeds are fixed by the group's
        seeds.append([fleet.calls[0][1].seed] + sorted(p.seed for _, p in fleet.calls[1:]))
    assert seeds[0] == seeds[1] and seeds[0][0] == 11 and len(set(seeds[0][1:])) == len(seeds[0]) - 1


def test_metrics_by_numbers():
    def s(turns, calls, errors, timeouts, secs):
        return Sample(prompt_ids=[1], metadata={"multi_turn": {"turns": turns, "tool_calls": calls,
                                                               "tool_errors": errors, "tool_timeouts": timeouts,
                                                               "tool_s": secs}})
    m = multi_turn_metrics([s(1, 0, 0, 0, 0.0), s(3, 2, 1, 0, 0.5), s(2, 1, 0, 1, 2.0), s(1, 1, 0, 0, 0.25)])
    assert m == {"rollout/turns_mean": 7 / 4, "rollout/tool_calls_mean": 1.0, "rollout/tool_error_frac": 0.25,
                 "rollout/tool_timeout_frac": 0.25, "rollout/tool_using_frac": 0.75, "time/tool_s": 2.75}


def test_config_refusals_name_the_key():
    from dapo_megatron.config import ConfigError, build_config

    for override, match in (("rollout.multi_turn.format=xml", "rollout.multi_turn: format='xml'; use one of"),
                            ("rollout.multi_turn.tools=[nosuch]", "'nosuch' is unknown; use one of calculator"),
                            ("rollout.multi_turn.tools=[os:nosuchfn]", "cannot load 'os:nosuchfn'"),
                            ("rollout.multi_turn.max_turns=0", "max_turns=0; use 1 or more")):
        with pytest.raises(ConfigError, match=match):
            build_config(None, [override])
    cfg = build_config(None, ["rollout.multi_turn.enabled=true", "rollout.multi_turn.tools=[calculator,python]"])
    assert cfg.rollout.multi_turn.tools == ["calculator", "python"]
    assert dataclasses.asdict(cfg.rollout.multi_turn)["max_turns"] == 4


def test_tool_limit_keys_act_by_numbers(tok):
    cfg = MultiTurnConfig(enabled=True, tool_timeout_s=0.3, max_output_chars=3, python_memory_mb=200)
    assert (cfg.limits().timeout_s, cfg.limits().max_output_chars, cfg.limits().memory_mb) == (0.3, 3, 200)
    prompt = chars(tok, "Q")
    turns = [chars(tok, "```calculator\n2**20\n```\n"), [tok.eos_token_id]]
    runner = budgeted(MultiTurnRunner(dataclasses.replace(cfg, format="fenced"), tok), 200)
    s = run(runner, TurnFleet(prompt, turns), prompt, n=1)[0]
    assert "```output\n104\n```" in tok.decode(s.response_ids)  # 1048576 cut to max_output_chars
    # A user tool that outlives tool_timeout_s is answered as a timeout (its thread is left to finish).
    cfg = MultiTurnConfig(enabled=True, format="fenced", tools=["tests.test_multi_turn:sleepy"], tool_timeout_s=0.2)
    turns = [chars(tok, "```sleepy\n1.5\n```\n"), [tok.eos_token_id]]
    s = run(budgeted(MultiTurnRunner(cfg, tok), 300), TurnFleet(prompt, turns), prompt, n=1)[0]
    assert "```output\nError: timeout: no answer within 0.2s\n```" in tok.decode(s.response_ids)
    assert multi_turn_metrics([s])["rollout/tool_timeout_frac"] == 1.0


def sleepy(input: str) -> str:  # a user tool, tests.test_multi_turn:sleepy
    import time

    time.sleep(float(input))
    return "woke"


def test_hermes_tool_schemas_go_into_the_prompt_through_the_chat_template(tmp_path):
    import json

    from dapo_megatron.data.dataset import PromptDataset

    tok = toy_tokenizer()
    tok.chat_template = ("{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }}({{ t.function.parameters."
                         "required | join(',') }});{% endfor %}{% endif %}" + tok.chat_template)
    runner = MultiTurnRunner(MultiTurnConfig(enabled=True, tools=["calculator", "python", "tests.test_tools:shout"]),
                             tok)
    schemas = runner.tool_schemas()
    assert schemas[0]["function"]["description"].startswith("Evaluate an arithmetic expression")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "2*3", "answer": "6"}) + "\n")
    item = PromptDataset(data, tok, template="none", tools=schemas)[0]
    assert item.prompt_text.startswith("TOOLS:calculator(expression);python(code);shout(text);<|im_start|>user\n2*3")
    assert PromptDataset(data, tok, template="none")[0].prompt_text.startswith("<|im_start|>user")
    fenced = MultiTurnRunner(MultiTurnConfig(enabled=True, format="fenced"), tok)
    assert fenced.tool_schemas() is None  # a base model's prompt template names its tools


def test_tir_recipe_plans_on_its_cluster():
    from pathlib import Path

    from dapo_megatron.config import build_config
    from dapo_megatron.placement import make_plan

    path = Path(__file__).resolve().parents[1] / "examples/dapo_tir_qwen2.5_7b/config.yaml"
    assert path.read_text().startswith("# cluster: 1 node x 8 GPUs, 80 GB\n")
    cfg = build_config(str(path))
    assert cfg.rollout.multi_turn.enabled and cfg.rollout.multi_turn.tools == ["python"]
    assert cfg.data.template.endswith('{question}\n\nRemember to put your answer on its own line after "Answer:".')
    plan = make_plan(cfg, 1, 8)
    assert plan.kind == "colocated" and (plan.tp, plan.pp, plan.dp) == (4, 1, 2) and plan.sync_mode == "disk"


def test_dynamic_sampling_drops_a_group_aborted_mid_trajectory_and_shapes_whole_responses(tok):
    """A group whose second turn is aborted is dropped whole (never half-trained; a resumed run regenerates it), and
    overlong shaping sees the whole response, model and tool tokens."""
    from dapo_megatron.algo.overlong import OverlongConfig
    from dapo_megatron.rollout.buffer import DynamicSamplingBuffer, DynamicSamplingConfig
    from tests.test_buffer import LabelScorer, ScriptedPrompts

    call = chars(tok, "```calculator\n1+1\n```\n")

    class Fleet:
        async def generate_group(self, samples, params):
            first = len(samples[0].prompt_ids) == 1
            for s in samples:
                s.response_ids = call if first else [tok.eos_token_id]
                s.rollout_logprobs = [-0.1] * len(s.response_ids)
                s.finish_reason = "abort" if not first and s.prompt_ids[0] == 101 else "stop"
            return samples

    runner = fenced_runner(tok)
    params = GenerationParams(max_tokens=60)
    cfg = DynamicSamplingConfig(rollout_batch_size=2, n_samples_per_prompt=4, max_num_gen_batches=2)
    overlong = OverlongConfig(enable=True, len=40, penalty_factor=1.0)
    buf = DynamicSamplingBuffer(cfg, ScriptedPrompts([2, 2, 2]), lambda g: runner.generate_group(Fleet(), g, params),
                                LabelScorer(), overlong, 60)
    groups, metrics = asyncio.run(buf.collect())
    assert metrics["rollout/groups_dropped_aborted"] == 1 and [g[0].prompt_ids for g in groups] == [[100], [102]]
    length = len(call) + len(runner.renderer.ids("2")) + 1  # turn 1, the tool's "2", EOS
    for s in (s for g in groups for s in g):
        assert s.response_length == length and s.metadata["overlong_penalty"] == pytest.approx((20 - length) / 40)


def test_eval_leaves_the_steps_tool_samples_alone():
    """Eval's conversations are not the step's, and with rollout.async_steps >= 2 the producer may be generating the
    step's meanwhile: eval neither adds to nor clears the samples the step's tool metrics are taken from."""
    from types import SimpleNamespace

    from dapo_megatron.train.stages import RolloutStage

    class Conversations:  # the multi-turn runner: answers every sample with one token
        async def generate_group(self, client, group, params):
            for s in group:
                s.response_ids = [7]
            return group

    class Scorer:
        def score_samples(self, samples):
            for s in samples:
                s.correct = True

    stage = object.__new__(RolloutStage)
    stage.cfg = SimpleNamespace(eval=SimpleNamespace(n_samples=2, temperature=0.0, top_p=1.0, max_response_length=4),
                                rollout=SimpleNamespace(temperature=1.0, top_p=1.0, top_k=-1, max_response_length=4))
    stage.multi_turn, stage.client, stage.scorer = Conversations(), None, Scorer()
    stage._eval_items = [SimpleNamespace(prompt_ids=[5, 6], label="1")]
    stage.run_on_loop = asyncio.run
    steps = [Sample(prompt_ids=[9], index=0)]
    stage._tool_samples = list(steps)  # a step's conversations so far
    assert stage.evaluate(None) == {"eval/avg@2": 1.0, "eval/num_prompts": 1}
    assert stage._tool_samples == steps
