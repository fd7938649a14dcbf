"""MoE conversion HF <-> Megatron in the hub's per-expert layout: bit-identical round trip through a checkpoint
loaded and re-saved at TP=2 x EP=2, with an odd vocabulary padded for TP=2 and stripped on the way back; unknown
expert layouts refused with the tensor named."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dapo_megatron.models.tiny import make_tiny_hf_model
from tests.helpers.forked import run_cli
from test_convert import SCRIPTS, assert_same_tensors, edited_copy, h2m, m2h, run_conversions

FAMILIES = ["qwen3_moe", "qwen2_moe"]
ODD_VOCAB = 101  # padded to 256 rows at TP=2 (make_vocab_size_divisible_by=128)


@pytest.mark.dist
@pytest.mark.slow
def test_moe_roundtrip_through_tp2_ep2_is_bit_identical(tmp_path, torchrun):
    t = tmp_path
    hf = {f: make_tiny_hf_model(t / f"hf_{f}", f, seed=5, vocab_size=ODD_VOCAB) for f in FAMILIES}
    res = run_conversions([h2m(hf[f], t / f"mg_{f}", "--tensor-model-parallel-size", "2") for f in FAMILIES], t)
    assert all(r["rc"] == 0 for r in res), res
    jobs = [{"hf_dir": str(hf[f]), "mg_root": str(t / f"mg_{f}"), "out_root": str(t / f"re_{f}")} for f in FAMILIES]
    (t / "jobs.json").write_text(json.dumps(jobs))
    torchrun(SCRIPTS / "moe_convert.py", 2, t / "jobs.json", 2, 1, 2, 1)  # TP=2 x EP=2, expert TP 1
    res = run_conversions([m2h(t / f"re_{f}", t / f"back_{f}") for f in FAMILIES], t)
    assert all(r["rc"] == 0 for r in res), res
    for f in FAMILIES:
        assert_same_tensors(hf[f], t / f"back_{f}")


def test_odd_vocab_roundtrip_at_tp2_is_bit_identical(tmp_path):
    """HF (vocab 101) -> Megatron padded for TP=2 (256 rows, recorded in the manifest) -> HF (101 rows again).
    Qwen3-MoE here (a MoE and a dense layer); both families go through TP=2 x EP=2 with this vocabulary in the slow
    test above."""
    from megatron.core import dist_checkpointing

    from dapo_megatron.models import ckpt_layout

    t = tmp_path
    hf = {f: make_tiny_hf_model(t / f"hf_{f}", f, seed=7, vocab_size=ODD_VOCAB, num_hidden_layers=2)
          for f in FAMILIES[:1]}
    for f in hf:  # forked from the warm test server: no imports paid per call
        for args in (h2m(hf[f], t / f"mg_{f}", "--tensor-model-parallel-size", "2"),
                     m2h(t / f"mg_{f}", t / f"back_{f}")):
            rc, out, err = run_cli(["convert", args["cmd"], *args["args"]], timeout=120)
            assert rc == 0, (args, out[-2000:], err[-4000:])
        it = t / f"mg_{f}" / "iter_0000000"
        assert ckpt_layout.read_manifest(it)["vocab"] == {
            "padded_vocab_size": 256, "tensor_model_parallel_size": 2, "make_vocab_size_divisible_by": 128}
        stored = dist_checkpointing.load_tensors_metadata(str(it / "model"))
        for key in ("embedding.word_embeddings.weight", "output_layer.weight"):  # both untied in these configs
            assert tuple(stored[key].global_shape) == (256, 64), (f, key)
        assert_same_tensors(hf[f], t / f"back_{f}")
        back = load_file(t / f"back_{f}" / "model-00001-of-00001.safetensors")
        assert back["model.embed_tokens.weight"].shape[0] == ODD_VOCAB and back["lm_head.weight"].shape[0] == ODD_VOCAB
        assert torch.count_nonzero(back["lm_head.weight"][-1]) > 0  # the last real row, not a padding row


def test_unknown_expert_layout_is_refused(tmp_path):
    src = make_tiny_hf_model(tmp_path / "hf", "qwen2_moe", seed=1, num_hidden_layers=1)
    tensors = load_file(src / "model.safetensors")
    fused = {k.replace("shared_expert.", "shared_experts."): v for k, v in tensors.items()}
    bad = edited_copy(src, tmp_path / "bad")
    save_file(fused, bad / "model.safetensors")
    (res,) = run_conversions([h2m(bad, tmp_path / "out")], tmp_path)
    assert res["rc"] == 2 and "shared_experts" in res["err"] and "the converter knows" in res["err"], res
    assert len(res["err"].strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
