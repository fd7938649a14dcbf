"""Embedded engine: sampling math, log-probs == a fresh teacher-forced forward, greedy == HF generate, stops."""
import asyncio
import concurrent.futures
import math

import pytest
import torch

from dapo_megatron.models.tiny import make_tiny_hf_model
from dapo_megatron.rollout.engine import Engine, SamplingParams, sample_tokens
from waiting import held, result


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine_models")
    return {fam: make_tiny_hf_model(root / fam, family=fam, seed=0) for fam in ("qwen2.5", "qwen3", "llama")}


@pytest.fixture(scope="module")
def engine(tiny_models):
    e = Engine(tiny_models["qwen2.5"], max_batch_size=8, seed=0)
    yield e
    e.shutdown()


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def teacher_forced_logprobs(model, prompt, response, temperature):
    """log_softmax(logits / T) of each response token, from one forward pass over prompt + response."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float()
    t = temperature if temperature > 0 else 1.0
    return torch.log_softmax(logits / t, -1).gather(1, torch.tensor(response)[:, None])[:, 0]


# --------------------------------------------------------------------------- sample_tokens (pure)
def _one_row(probs, *, temperature=1.0, top_p=1.0, top_k=-1, u=0.5):
    logits = torch.tensor([[math.log(p) for p in probs]])
    tok, lp = sample_tokens(logits, torch.tensor([temperature]), torch.tensor([top_p]), torch.tensor([top_k]),
                            torch.tensor([u]))
    return int(tok), float(lp)


def test_sample_tokens_inverse_cdf_without_filtering():
    # probs 0.5, 0.3, 0.2: CDF 0.5, 0.8, 1.0
    assert _one_row([0.5, 0.3, 0.2], u=0.4) == (0, pytest.approx(math.log(0.5)))
    assert _one_row([0.5, 0.3, 0.2], u=0.6) == (1, pytest.approx(math.log(0.3)))
    assert _one_row([0.5, 0.3, 0.2], u=0.9) == (2, pytest.approx(math.log(0.2)))


def test_sample_tokens_top_p_keeps_nucleus_and_returns_unrenormalised_logprob():
    # sorted 0.2, 0.5, 0.3 -> 0.5, 0.3, 0.2; mass before each: 0, 0.5, 0.8; top_p 0.6 keeps {0.5, 0.3}.
    # renormalised CDF over kept mass 0.8: u=0.7 -> 0.56 > 0.5 -> the 0.3 token (id 2). Log-prob stays log(0.3).
    assert _one_row([0.2, 0.5, 0.3], top_p=0.6, u=0.7) == (2, pytest.approx(math.log(0.3)))
    assert _one_row([0.2, 0.5, 0.3], top_p=0.6, u=0.99)[0] == 2  # never the dropped 0.2 token
    assert _one_row([0.2, 0.5, 0.3], top_k=1, u=0.99) == (1, pytest.approx(math.log(0.5)))


def test_sample_tokens_temperature_and_greedy():
    # T = 2: probs ~ sqrt(p) = 0.7071, 0.5477, 0.4472 (sum 1.7020) -> p0 = 0.41545
    tok, lp = _one_row([0.5, 0.3, 0.2], temperature=2.0, u=0.3)
    assert tok == 0 and lp == pytest.approx(math.log(0.7071068 / 1.7020386), abs=1e-5)
    # greedy = SGLang's temperature 1 + top_k 1: argmax, log-prob of the untempered distribution
    assert _one_row([0.2, 0.5, 0.3], temperature=0.0, u=0.99) == (1, pytest.approx(math.log(0.5)))


def test_sampling_params_validation_messages():
    assert SamplingParams.from_dict({"stop": "x", "top_k": -1, "min_p": 0.0}).stop == ("x",)
    for bad, field in [({"max_new_tokens": -1}, "max_new_tokens"), ({"temperature": -0.5}, "temperature"),
                       ({"top_p": 0}, "top_p"), ({"top_k": 0}, "top_k"), ({"n": 0}, "n"),
                       ({"min_p": 0.1}, "min_p"), ({"nonsense": 1}, "nonsense"), ({"stop_token_ids": 3}, "stop")]:
        with pytest.raises(ValueError, match=field):
            SamplingParams.from_dict(bad)


# --------------------------------------------------------------------------- engine vs HF
@pytest.mark.parametrize("family", ["qwen2.5", "qwen3", "llama"])
def test_logprobs_of_own_samples_equal_teacher_forced_forward(tiny_models, family):
    e = Engine(tiny_models[family], max_batch_size=16, seed=1)
    model = hf_model(tiny_models[family])
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [20]]
    temps = [1.0, 0.7, 0.0]

    async def run():  # concurrent: different prompt lengths share the left-padded batch
        return await asyncio.gather(*[e.generate(p, {"max_new_tokens": 12, "temperature": t, "top_p": 0.9, "n": 2,
                                                     "ignore_eos": True}) for p, t in zip(prompts, temps)])
    try:
        outs = asyncio.run(run())
    finally:
        e.shutdown()
    for prompt, t, group in zip(prompts, temps, outs):
        for out in group:
            response = out["output_ids"]
            got = torch.tensor([lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]])
            assert [tok for _, tok, _ in out["meta_info"]["output_token_logprobs"]] == response
            assert len(response) == 12
            ref = teacher_forced_logprobs(model, prompt, response, t)
            assert (got - ref).abs().max().item() < 1e-4


def test_greedy_equals_hf_generate(tiny_models, engine):
    model = hf_model(tiny_models["qwen2.5"])
    prompts = [[5, 6, 7, 8], [40, 41], [3, 30, 31, 32, 33, 34]]
    futures = [engine.submit(p, {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True}) for p in prompts]
    for prompt, fut in zip(prompts, futures):
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=10, eos_token_id=None,
                                 pad_token_id=0)[0, len(prompt):].tolist()
        assert fut.result()[0]["output_ids"] == ref


def test_n_samples_seeded_and_reproducible(engine):
    params = {"max_new_tokens": 8, "temperature": 1.0, "n": 4, "sampling_seed": 7, "ignore_eos": True}
    a = engine.generate_sync([5, 6, 7], params, rid="seeded")
    b = engine.generate_sync([5, 6, 7], params)
    c = engine.generate_sync([5, 6, 7], {**params, "sampling_seed": 8})
    assert [o["output_ids"] for o in a] == [o["output_ids"] for o in b]
    assert [o["output_ids"] for o in a] != [o["output_ids"] for o in c]
    assert len({tuple(o["output_ids"]) for o in a}) == 4  # the n samples differ from each other
    assert [o["meta_info"]["id"] for o in a] == ["seeded-0", "seeded-1", "seeded-2", "seeded-3"]


def test_length_and_stop_token_ids(engine):
    base = {"temperature": 1.0, "sampling_seed": 3, "ignore_eos": True}
    full = engine.generate_sync([5, 6, 7], {**base, "max_new_tokens": 10})[0]
    assert full["meta_info"]["finish_reason"] == {"type": "length", "length": 10}
    assert full["meta_info"]["completion_tokens"] == 10
    stop_id = full["output_ids"][4]
    first = full["output_ids"].index(stop_id)
    out = engine.generate_sync([5, 6, 7], {**base, "max_new_tokens": 10, "stop_token_ids": [stop_id]})[0]
    assert out["output_ids"] == full["output_ids"][:first + 1]  # the stop token is kept in ids and logprobs
    assert len(out["meta_info"]["output_token_logprobs"]) == first + 1
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_id}
    assert out["text"] == engine.tokenizer.decode(full["output_ids"][:first])  # ...but not in the text


def test_stop_strings_trim_text(engine):
    base = {"temperature": 1.0, "sampling_seed": 11, "ignore_eos": True, "max_new_tokens": 16,
            "skip_special_tokens": False}
    full = engine.generate_sync([5, 6, 7], base)[0]
    text = engine.tokenizer.decode(full["output_ids"], skip_special_tokens=False)
    stop = text[6:8]
    out = engine.generate_sync([5, 6, 7], {**base, "stop": [stop]})[0]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert out["text"] == text[:text.index(stop)]
    assert full["output_ids"][:len(out["output_ids"])] == out["output_ids"]
    kept = engine.generate_sync([5, 6, 7], {**base, "stop": [stop], "no_stop_trim": True})[0]
    assert kept["output_ids"] == out["output_ids"]
    assert kept["text"] == engine.tokenizer.decode(out["output_ids"], skip_special_tokens=False)
    assert stop in kept["text"]


def test_eos_from_the_model_config_stops_unless_ignore_eos(tiny_models, engine, tmp_path):
    first = engine.generate_sync([5, 6, 7, 8], {"max_new_tokens": 1, "temperature": 0})[0]["output_ids"][0]
    path = make_tiny_hf_model(tmp_path / "eos", family="qwen2.5", seed=0, eos_token_id=first)  # same weights
    e = Engine(path)
    try:
        out = e.generate_sync([5, 6, 7, 8], {"max_new_tokens": 5, "temperature": 0})[0]
        assert out["output_ids"] == [first] and out["meta_info"]["finish_reason"] == {"type": "stop",
                                                                                      "matched": first}
        assert out["text"] == ""
        out = e.generate_sync([5, 6, 7, 8], {"max_new_tokens": 5, "temperature": 0, "ignore_eos": True})[0]
        assert len(out["output_ids"]) == 5 and out["meta_info"]["finish_reason"]["type"] == "length"
    finally:
        e.shutdown()


def test_continuous_batching_short_request_overtakes_long_one(tiny_models):
    e = Engine(tiny_models["qwen2.5"], max_batch_size=2)
    try:
        e.hold(steps=1)
        long = e.submit([5, 6], {"max_new_tokens": 400, "ignore_eos": True})
        held(e)  # long is admitted and generating
        short = e.submit([7, 8], {"max_new_tokens": 3, "ignore_eos": True})
        queued = e.submit([9], {"max_new_tokens": 3, "ignore_eos": True})  # over max_batch_size: waits its turn
        e.hold(steps=20)  # enough for short and then queued (2 steps each), far too few for long's 400 tokens
        assert len(result(short, "the short request")[0]["output_ids"]) == 3
        assert len(result(queued, "the queued request")[0]["output_ids"]) == 3
        held(e)
        assert not long.done()
        e.release()
        assert len(result(long, "the long request after release", 120)[0]["output_ids"]) == 400
    finally:
        e.shutdown()


def test_abort_returns_partial_output(engine):
    engine.hold(steps=1)  # one step: prefill (1 token) and one decode (2 tokens), then held mid-generation
    try:
        fut = engine.submit([5, 6], {"max_new_tokens": 1000, "ignore_eos": True, "n": 2}, rid="to-abort")
        waiting_fut = engine.submit([5, 6], {"max_new_tokens": 0})  # resolves at once
        assert waiting_fut.result()[0]["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
        held(engine)
        assert engine.abort_request("to-abort") == 1
        outs = result(fut, "the aborted request", 30)
    finally:
        engine.release()
    for out in outs:
        assert out["meta_info"]["finish_reason"]["type"] == "abort"
        assert len(out["output_ids"]) == 2
        assert len(out["meta_info"]["output_token_logprobs"]) == len(out["output_ids"])


def test_hold_runs_exactly_the_allowed_steps_and_release_resumes(engine):
    with pytest.raises(ValueError, match="steps must be >= 0"):
        engine.hold(steps=-1)
    engine.hold(steps=3)
    try:
        assert not engine.wait_held(0.2)  # no request yet: the 3 steps are not spent
        fut = engine.submit([5, 6], {"max_new_tokens": 50, "ignore_eos": True}, rid="held")
        held(engine)
        with pytest.raises(concurrent.futures.TimeoutError):
            fut.result(timeout=0.3)  # held: not one more token
        engine.abort_request("held")
        assert len(result(fut, "the held request's abort")[0]["output_ids"]) == 4  # 1 + 1 + 1 + 1
        engine.hold()
        fut = engine.submit([5, 6], {"max_new_tokens": 50, "ignore_eos": True})
        assert engine.wait_held(5) and engine.num_requests == 1
        engine.release()
        assert len(result(fut, "the released request")[0]["output_ids"]) == 50
    finally:
        engine.release()


def test_pause_in_place_then_continue(engine):
    engine.pause_generation(mode="in_place")
    try:
        fut = engine.submit([5, 6], {"max_new_tokens": 4, "ignore_eos": True})
        with pytest.raises(concurrent.futures.TimeoutError):
            fut.result(timeout=0.5)
    finally:
        engine.continue_generation()
    assert len(fut.result(timeout=10)[0]["output_ids"]) == 4


def test_bad_requests_raise_value_error(engine):
    with pytest.raises(ValueError, match="not a token id"):
        engine.submit([1, engine.vocab_size], {})
    with pytest.raises(ValueError, match="non-empty"):
        engine.submit([], {})
    with pytest.raises(ValueError, match="context length"):
        engine.submit([1] * engine.context_len, {})


@pytest.mark.parametrize("vocab", [32768, 5000])  # a multiple of the block, and not
def test_two_level_inverse_cdf_equals_the_flat_one_and_never_picks_a_zero_weight(vocab):
    from dapo_megatron.rollout.sampling import _inverse_cdf

    g = torch.Generator().manual_seed(0)
    weights = torch.rand(64, vocab, generator=g) ** 8
    weights[:32] *= torch.rand(32, vocab, generator=g) < 0.01  # sparse rows, as after top-k / top-p
    weights[0, :] = 0.0
    weights[0, 1234] = 3.0  # one token carries all the mass
    uniform = torch.rand(64, generator=g)
    uniform[1] = 1 - 2 ** -24  # the largest float below 1
    got = _inverse_cdf(weights, uniform)
    cdf = weights.double().cumsum(-1)
    want = torch.searchsorted(cdf, (uniform.double() * cdf[:, -1])[:, None], right=True)[:, 0]
    assert got[0] == 1234
    assert torch.all(weights.gather(1, got[:, None]) > 0)
    assert (got != want).sum() <= 1  # float32 block sums against a float64 CDF: at most a boundary case
