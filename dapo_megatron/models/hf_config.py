"""Hugging Face config.json -> megatron-core TransformerConfig / GPTModel arguments.

One mapping for the model builder, the conversion tools and weight sync. Supported: Qwen2 / Qwen2.5 (qkv bias,
tied or untied embeddings), Qwen3 (q/k RMSNorm, no bias), Llama 2/3 (GQA, rope theta, llama3 rope scaling).
"""
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import moe as moe_lib

SUPPORTED_ARCHITECTURES = {
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "LlamaForCausalLM": "llama",
    "Qwen3MoeForCausalLM": "qwen3_moe",  # models/moe.py
    "Qwen2MoeForCausalLM": "qwen2_moe",
}

# Megatron's RotaryEmbedding(rope_scaling=True) hard-codes these llama3 parameters; only the factor is free.
_MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class ModelArch:
    """Everything about an HF checkpoint the Megatron side needs, in one flat record."""

    family: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int
    max_position_embeddings: int
    norm_epsilon: float
    rotary_base: float
    rope_scaling_factor: float | None  # llama3-style scaling when set
    qkv_bias: bool
    qk_layernorm: bool
    tie_word_embeddings: bool
    moe: "moe_lib.MoEArch | None" = None  # experts, router, dense/MoE layer pattern (models/moe.py)

    @property
    def query_projection_size(self) -> int:
        return self.kv_channels * self.num_attention_heads


def load_hf_config(path) -> dict:
    path = Path(path)
    cfg_file = path / "config.json" if path.is_dir() else path
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no config.json at {cfg_file}: pass a Hugging Face model folder")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise UnsupportedModelError(f"{cfg_file} is not valid JSON ({e}); re-download or fix the file") from e


def _rope(cfg: dict) -> tuple[float, float | None]:
    # transformers >= 5 nests rope settings in `rope_parameters`; older configs use rope_theta + rope_scaling.
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or params
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type in (None, "default"):
        return float(theta), None
    if rope_type != "llama3":
        raise UnsupportedModelError(
            f"rope_scaling.rope_type={rope_type!r} is not supported (supported: default, llama3)")
    for key, want in _MEGATRON_LLAMA3_ROPE.items():
        if float(scaling.get(key, want)) != want:
            raise UnsupportedModelError(
                f"rope_scaling.{key}={scaling.get(key)} is not supported: megatron-core's llama3 rope uses {want}")
    return float(theta), float(scaling["factor"])


def arch_from_hf(cfg: dict) -> ModelArch:
    """Validate an HF config dict and return the architecture record; errors name the offending field."""
    archs = cfg.get("architectures") or []
    if len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"architectures={archs} is not supported; supported: {sorted(SUPPORTED_ARCHITECTURES)}")
    family = SUPPORTED_ARCHITECTURES[archs[0]]
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"hidden_act={cfg['hidden_act']!r} is not supported (only silu / SwiGLU)")
    if family == "llama" and cfg.get("mlp_bias"):
        raise UnsupportedModelError("mlp_bias=true is not supported")
    if family in ("qwen2", "qwen2_moe") and cfg.get("use_sliding_window"):
        raise UnsupportedModelError("use_sliding_window=true is not supported; set it to false")
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise UnsupportedModelError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    theta, rope_factor = _rope(cfg)
    qkv_bias = {"qwen2": True, "qwen3": bool(cfg.get("attention_bias", False)),
                "llama": bool(cfg.get("attention_bias", False)), "qwen2_moe": bool(cfg.get("qkv_bias", True)),
                "qwen3_moe": bool(cfg.get("attention_bias", False))}[family]
    return ModelArch(
        family=family,
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=kv_heads,
        kv_channels=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        vocab_size=cfg["vocab_size"],
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        norm_epsilon=cfg.get("rms_norm_eps", 1e-6),
        rotary_base=theta,
        rope_scaling_factor=rope_factor,
        qkv_bias=qkv_bias,
        qk_layernorm=family in ("qwen3", "qwen3_moe"),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        moe=moe_lib.moe_arch_from_hf(cfg, family, UnsupportedModelError),
    )


def padded_vocab_size(vocab_size: int, divisor: int = 128, tp: int = 1) -> int:
    """Megatron-LM's padded vocabulary: the next multiple of `divisor` x TP (every TP rank holds an equal slice).

    The padded rows are zeros that no token id reaches; log-probs mask their logits out (train/logprobs.py) and
    conversion / weight sync strip them (models/weights.py). It depends on TP, as in Megatron-LM: a checkpoint loads
    at the TP sizes that give the same padded size.
    """
    if not isinstance(divisor, int) or divisor < 1:
        raise UnsupportedModelError(f"model.make_vocab_size_divisible_by={divisor!r} must be an integer >= 1")
    multiple = divisor * tp
    return -(-vocab_size // multiple) * multiple


def check_parallel_sizes(arch: ModelArch, tp: int, pp: int, ep: int = 1, etp: int | None = None) -> None:
    if arch.num_attention_heads % tp or arch.num_query_groups % tp:
        raise UnsupportedModelError(
            f"tensor_model_parallel_size={tp} must divide num_attention_heads={arch.num_attention_heads} and "
            f"num_key_value_heads={arch.num_query_groups}; pick a divisor of {arch.num_query_groups}")
    if arch.num_layers % pp:
        raise UnsupportedModelError(
            f"pipeline_model_parallel_size={pp} must divide num_hidden_layers={arch.num_layers}")
    moe_lib.check_parallel(arch.moe, tp, ep, etp, UnsupportedModelError)


def transformer_config_kwargs(arch: ModelArch, *, on_gpu: bool, fp8: str | None = None,
                              fp8_recipe: str = "delayed", moe_options=None, tp: int = 1) -> dict:
    """TransformerConfig fields for `arch`. Fusions without a CPU kernel are chosen by device, not by the user."""
    if fp8 not in (None, "e4m3", "hybrid"):
        raise UnsupportedModelError(f"fp8={fp8!r} is not supported; use null, e4m3 or hybrid")
    if fp8 and not on_gpu:
        raise UnsupportedModelError("fp8 needs a GPU with Transformer Engine; set fp8: null on CPU")
    recipe = {"delayed": "delayed", "current": "tensorwise", "tensorwise": "tensorwise"}.get(fp8_recipe)
    if recipe is None:
        raise UnsupportedModelError(f"fp8_recipe={fp8_recipe!r} is not supported; use delayed or current")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    kw = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=on_gpu,
        # CPU: these have no CPU kernel (fail at build) or jit-compile slowly and change numerics.
        gradient_accumulation_fusion=False,
        apply_rope_fusion=on_gpu,
        bias_activation_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=on_gpu,
        persist_layer_norm=on_gpu,
        cross_entropy_loss_fusion=False,
        use_cpu_initialization=not on_gpu,
        batch_p2p_sync=on_gpu,  # the default p2p path calls torch.cuda.synchronize
    )
    if fp8:
        kw.update(fp8=fp8, fp8_recipe=recipe)
    if arch.moe is not None:
        kw.update(moe_lib.transformer_config_kwargs(arch.moe, moe_options or moe_lib.MoEOptions(), on_gpu=on_gpu,
                                                  tp=tp))
    return kw
