"""Model builder: HF config mapping, errors, and TP/PP logits equal to TP=1 and to the HF model."""
import pytest
import torch

from dapo_megatron.models.hf_config import UnsupportedModelError, arch_from_hf, check_parallel_sizes
from dapo_megatron.models.tiny import make_tiny_hf_model, tiny_config_dict
from dapo_megatron.parallel import ParallelConfig, check_sizes
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = REPO / "tests" / "dist_scripts" / "model_logits.py"


def test_arch_mapping_per_family():
    q25 = arch_from_hf(tiny_config_dict("qwen2.5", 128))
    assert (q25.qkv_bias, q25.tie_word_embeddings, q25.qk_layernorm) == (True, True, False)
    q3 = arch_from_hf(tiny_config_dict("qwen3", 128))
    assert (q3.qkv_bias, q3.qk_layernorm, q3.kv_channels) == (False, True, 32)
    ll = arch_from_hf(tiny_config_dict("llama", 128))
    assert (ll.num_attention_heads, ll.num_query_groups, ll.rope_scaling_factor, ll.rotary_base) == (16, 8, 8.0, 5e5)


def test_transformers5_rope_parameters_layout():
    cfg = tiny_config_dict("llama", 128)
    scaling = cfg.pop("rope_scaling")
    cfg["rope_parameters"] = {**scaling, "rope_theta": cfg.pop("rope_theta")}
    arch = arch_from_hf(cfg)
    assert (arch.rotary_base, arch.rope_scaling_factor) == (5e5, 8.0)


@pytest.mark.parametrize("change, field", [
    ({"architectures": ["MistralForCausalLM"]}, "architectures"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0}}, "low_freq_factor"),
])
def test_unsupported_config_names_the_field(change, field):
    cfg = {**tiny_config_dict("llama", 128), **change}
    with pytest.raises(UnsupportedModelError, match=field):
        arch_from_hf(cfg)


def test_parallel_size_errors_are_actionable():
    arch = arch_from_hf(tiny_config_dict("qwen2.5", 128))  # 4 heads, 2 kv heads, 4 layers
    check_parallel_sizes(arch, 2, 2)
    with pytest.raises(UnsupportedModelError, match="tensor_model_parallel_size=4 must divide num_attention_heads"):
        check_parallel_sizes(arch, 4, 1)
    with pytest.raises(UnsupportedModelError, match="pipeline_model_parallel_size=3 must divide num_hidden_layers=4"):
        check_parallel_sizes(arch, 1, 3)
    with pytest.raises(ValueError, match="world size 6 is not divisible"):
        check_sizes(ParallelConfig(tensor_model_parallel_size=4), 6)


def _hf_logits(hf_dir, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def _megatron_logits(torchrun, hf_dir, tp, pp, tmp_path):
    out = tmp_path / f"logits_tp{tp}_pp{pp}.pt"
    torchrun(SCRIPT, tp * pp, hf_dir, tp, pp, out)
    return torch.load(out)


@pytest.mark.dist
@pytest.mark.parametrize("family, layouts, vocab", [
    # tied embeddings + qkv bias (shared output layer across PP); odd vocabulary 101 padded to 128 (TP=1) and 256
    # (TP=2, where rank 1's shard is padding only)
    # (all three families at TP=2 x PP=2 against HF, odd vocabulary 101: tests/test_convert.py, default suite)
    pytest.param("qwen2.5", [(2, 1), (1, 2), (2, 2)], 101, marks=pytest.mark.slow),
    pytest.param("llama", [(2, 2)], 128, marks=pytest.mark.slow),  # GQA 16/8 heads, llama3 rope scaling, untied
    ("qwen3", [(2, 1)], 131),  # q/k norm, odd vocabulary
])
def test_parallel_logits_equal_tp1_and_hf(torchrun, tmp_path, family, layouts, vocab):
    hf_dir = make_tiny_hf_model(tmp_path / family, family, seed=3, vocab_size=vocab)
    base = _megatron_logits(torchrun, hf_dir, 1, 1, tmp_path)
    ref = _hf_logits(hf_dir, base["ids"])
    assert base["logits"].shape[-1] == ref.shape[-1] == vocab
    assert (base["logits"] - ref).abs().max().item() < 1e-4
    for tp, pp in layouts:
        got = _megatron_logits(torchrun, hf_dir, tp, pp, tmp_path)
        assert torch.equal(got["ids"], base["ids"])
        diff = (got["logits"] - base["logits"]).abs().max().item()
        assert diff < 1e-4, f"TP={tp} PP={pp} logits differ from TP=1 by {diff}"


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [None, "e4m3"])
def test_te_spec_forward_backward_gpu(tmp_path, torchrun, fp8):
    """Transformer Engine spec in bf16 (and FP8) on GPU: logits close to the HF model's."""
    hf_dir = make_tiny_hf_model(tmp_path / "m", "qwen2.5", seed=3, hidden_size=128, intermediate_size=256)
    out = tmp_path / "gpu.pt"
    torchrun(REPO / "tests" / "dist_scripts" / "model_logits.py", 1, hf_dir, 1, 1, out,
             env={"DAPO_FP8": fp8 or ""})
    got = torch.load(out)
    ref = _hf_logits(hf_dir, got["ids"].cpu())
    assert (got["logits"].float().cpu() - ref).abs().max().item() < (0.5 if fp8 else 0.1)
