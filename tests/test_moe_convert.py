"""MoE conversion HF <-> Megatron in the hub's per-expert layout: bit-identical round trip through a checkpoint
loaded and re-saved at TP=2 x EP=2; unknown expert layouts refused with the tensor named."""
import json

import pytest
from safetensors.torch import load_file, save_file

from dapo_megatron.models.tiny import make_tiny_hf_model
from test_convert import SCRIPTS, assert_same_tensors, edited_copy, h2m, m2h, run_conversions

FAMILIES = ["qwen3_moe", "qwen2_moe"]


@pytest.mark.dist
@pytest.mark.slow
def test_moe_roundtrip_through_tp2_ep2_is_bit_identical(tmp_path, torchrun):
    t = tmp_path
    hf = {f: make_tiny_hf_model(t / f"hf_{f}", f, seed=5) for f in FAMILIES}
    res = run_conversions([h2m(hf[f], t / f"mg_{f}") for f in FAMILIES], t)
    assert all(r["rc"] == 0 for r in res), res
    jobs = [{"hf_dir": str(hf[f]), "mg_root": str(t / f"mg_{f}"), "out_root": str(t / f"re_{f}")} for f in FAMILIES]
    (t / "jobs.json").write_text(json.dumps(jobs))
    torchrun(SCRIPTS / "moe_convert.py", 2, t / "jobs.json", 2, 1, 2, 1)  # TP=2 x EP=2, expert TP 1
    res = run_conversions([m2h(t / f"re_{f}", t / f"back_{f}") for f in FAMILIES], t)
    assert all(r["rc"] == 0 for r in res), res
    for f in FAMILIES:
        assert_same_tensors(hf[f], t / f"back_{f}")


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
