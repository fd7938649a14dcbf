"""Sequence parallelism for dense models at TP > 1 (parallel.sequence_parallel; default on at TP > 1).

The same run with SP on and off at TP=2 gives the same log-probs, loss, grad norm, entropy, train/rollout log-prob
gap, norm gradients and updated weights to fp32 noise, for Llama- and Qwen2-shaped models with an odd vocabulary,
packed (THD) and padded micro-batches padded only as SP needs (tests/dist_scripts/sp_actor.py). A checkpoint saved
at TP=2 with SP resumes at TP=1 (sp_resume.py). The bytes saved for backward per layer shrink as Korthikanti et al.
2022 say.
"""
from pathlib import Path

import pytest
import torch

from dapo_megatron.models.tiny import make_tiny_hf_model
from dapo_megatron.parallel import ParallelConfig, check_supported, resolve_sequence_parallel
from dapo_megatron.train.packing import pack_microbatch, sequence_multiple
from dapo_megatron.types import Sample

SCRIPTS = Path(__file__).parent / "dist_scripts"
VOCAB = 301  # odd: padded to 302 rows at TP=2 (make_vocab_size_divisible_by=1), rank 1's last row is padding
METRICS = ("actor/pg_loss", "actor/grad_norm", "actor/entropy")


def _max_diff(a, b):
    return max(abs(x - y) for u, v in zip(a, b) for x, y in zip(u, v))


def test_default_is_on_at_tp_above_one_and_refusals_name_the_key():
    assert resolve_sequence_parallel(ParallelConfig()) is False
    assert resolve_sequence_parallel(ParallelConfig(tensor_model_parallel_size=2)) is True
    assert resolve_sequence_parallel(ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=False)) is False
    check_supported(ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True))
    with pytest.raises(ValueError, match=r"^parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size"
                                         r" > 1 .*set it to null or false"):
        check_supported(ParallelConfig(sequence_parallel=True))
    with pytest.raises(ValueError, match=r"^parallel.sequence_parallel=false with tensor_model_parallel_size=2: "
                                         r"megatron-core trains mixture-of-experts layers"):
        check_supported(ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=False), num_experts=8)


@pytest.mark.parametrize("packed", [True, False])
def test_sp_pads_the_sequence_to_a_multiple_of_tp(packed):
    assert sequence_multiple(8, 2, True) == 8 and sequence_multiple(1, 2, True) == 2
    assert sequence_multiple(4, 3, True) == 12 and sequence_multiple(1, 2, False) == 1
    s = [Sample(prompt_ids=[1, 2], response_ids=[3, 4, 5], rollout_logprobs=[0.0] * 3),
         Sample(prompt_ids=[6, 7], response_ids=[8, 9], rollout_logprobs=[0.0] * 2)]
    mb = pack_microbatch(s, 0, sequence_multiple(1, 2, True), packed=packed)
    assert mb["tokens"].shape == ((1, 10) if packed else (2, 6))  # 9 -> 10 tokens, longest 5 -> 6
    if packed:  # the tail pad is a sequence of its own; the head never reads it
        assert mb["cu_seqlens"].tolist() == [0, 5, 9, 10] and int(mb["head_index"].max()) < 9


def _check_equal(r, layouts):
    for name in layouts:
        off, on = r[(name, False)], r[(name, True)]
        assert _max_diff(on["logprobs"], off["logprobs"]) < 1e-5, name
        if "ref_logprobs" in on:  # the reference model (initial weights) with SP
            assert _max_diff(on["ref_logprobs"], off["logprobs"]) < 1e-5
        assert on["gap"] == pytest.approx(off["gap"], abs=1e-5)  # the logged train/rollout log-prob gap
        for m in METRICS:
            assert on["metrics"][m] == pytest.approx(off["metrics"][m], rel=1e-5), (name, m)
        for k, g in off["norm_grads"].items():  # each TP rank's norm grad covers half the sequence before the sum
            assert (on["norm_grads"][k] - g).abs().max() <= 1e-5 * g.abs().max(), (name, k)
        for k, w in off["weights"].items():  # one Adam step at lr 1e-4
            assert (on["weights"][k] - w).abs().max() < 5e-6, (name, k)
        # exactly the norms over tokens are tagged for the TP grad sum (q/k norms act on whole heads)
        assert not off["norm_tagged"] and on["norm_tagged"] == on["token_norms"] and on["token_norms"], name
    assert r[(layouts[0], False)]["metrics"]["actor/grad_norm"] > 0.1  # the step really moved the weights


def _check_saved_activations(r, name, t=2):
    """Bytes per layer per token, in units of h: Korthikanti's model (bf16) h(10 + 24/t) without SP, 34h/t with SP;
    fp32 doubles both. Scores aside (flash attention has none), the SP/no-SP ratio is the model's."""
    off, on = r[(name, False)], r[(name, True)]
    per = off["seq"] * off["hidden_size"]
    a_off, a_on = off["saved_bytes_per_layer"], on["saved_bytes_per_layer"]
    assert a_on["all"] < a_off["all"]
    # The tensors only SP splits: 6 [s, h] fp32 tensors per layer (each norm's input, x * rstd and output, which
    # feeds QKV / fc1; Korthikanti's 10 = 4 of these in bf16 + 2 dropout masks, none at dropout 0), so SP saves
    # 24 (1 - 1/t) bytes per token per h
    assert (a_off["all"] - a_on["all"]) / per == pytest.approx(24 * (1 - 1 / t), rel=0.02)
    assert a_on["no_scores"] / a_off["no_scores"] == pytest.approx((34 / t) / (10 + 24 / t), rel=0.05)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sp")
    return {f: make_tiny_hf_model(root / f, f, seed=1, vocab_size=VOCAB) for f in ("llama", "qwen2")}


@pytest.mark.dist
def test_llama_sp_equals_no_sp_packed_and_padded(models, tmp_path, torchrun):
    out = tmp_path / "r.pt"
    torchrun(SCRIPTS / "sp_actor.py", 2, models["llama"], out, "packed,padded", 1)
    r = torch.load(out, weights_only=False)
    _check_equal(r, ["packed", "padded"])
    _check_saved_activations(r, "packed")


@pytest.mark.dist
def test_qwen2_sp_equals_no_sp_and_resumes_at_tp1(models, tmp_path, torchrun):
    out, ckpt, resumed = tmp_path / "r.pt", tmp_path / "ckpt", tmp_path / "resumed.pt"
    torchrun(SCRIPTS / "sp_actor.py", 2, models["qwen2"], out, "packed", 1, ckpt)
    r = torch.load(out, weights_only=False)
    _check_equal(r, ["packed"])
    _check_saved_activations(r, "packed")
    # saved at TP=2 with SP (model, optimizer, scheduler), resumed at TP=1 without: the same next step
    torchrun(SCRIPTS / "sp_resume.py", 1, models["qwen2"], ckpt, resumed)
    want, got = r[("packed", True)]["resume"], torch.load(resumed, weights_only=False)
    assert _max_diff(got["logprobs"], want["logprobs"]) < 1e-5
    for m in METRICS:
        assert got["metrics"][m] == pytest.approx(want["metrics"][m], rel=1e-5), m
    for k, w in want["weights"].items():
        assert (got["weights"][k] - w).abs().max() < 5e-6, k


@pytest.mark.dist
@pytest.mark.slow
def test_sp_equals_no_sp_at_tp2_pp2(models, tmp_path, torchrun):
    # 4 processes: SP activations cross the pipeline stages as [s/TP, b, h]
    out = tmp_path / "r.pt"
    torchrun(SCRIPTS / "sp_actor.py", 4, models["qwen2"], out, "packed,padded", 2)
    _check_equal(torch.load(out, weights_only=False), ["packed", "padded"])
