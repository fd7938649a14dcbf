"""Tiny random-init Hugging Face checkpoints built from real model-family configs.

Used by tests, benchmarks and the toy example: no downloads, the loading code is the real one. The shapes are shrunk,
everything else (architecture, norms, biases, tying, rope settings) is what the family's published config.json says.
"""
import json
import shutil
from pathlib import Path

import torch

TOY_TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "toy_tokenizer"

# Family -> config.json fields. Non-shape fields follow the published configs (Qwen2.5-0.5B-Instruct, Qwen3-0.6B,
# Llama-3.2-1B); shapes are small enough for CPU tests.
FAMILY_CONFIGS = {
    "qwen2.5": {  # qkv bias, tied embeddings
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": True, "use_sliding_window": False, "attention_dropout": 0.0,
    },
    "qwen2": {  # qkv bias, untied embeddings (Qwen2-7B style)
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": False, "use_sliding_window": False, "attention_dropout": 0.0,
    },
    "qwen3": {  # q/k RMSNorm, no bias, explicit head_dim
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_act": "silu",
        "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 1024, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "tie_word_embeddings": False, "attention_bias": False, "attention_dropout": 0.0,
        "use_sliding_window": False,
    },
    "llama": {  # Llama 3: GQA (8 kv heads < 16 heads), llama3 rope scaling, untied
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 16,
        "num_key_value_heads": 8, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
    },
    "qwen3_moe": {  # Qwen3-30B-A3B style: top-k softmax router, norm_topk_prob, no shared expert, q/k norm;
        # layer 1 dense (mlp_only_layers) to cover mixed layers
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_act": "silu",
        "hidden_size": 64, "intermediate_size": 160, "moe_intermediate_size": 48, "num_experts": 8,
        "num_experts_per_tok": 2, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [1],
        "router_aux_loss_coef": 0.001, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 32, "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": False, "attention_bias": False, "attention_dropout": 0.0, "use_sliding_window": False,
    },
    "qwen2_moe": {  # Qwen1.5-MoE-A2.7B / Qwen2-57B-A14B style: shared expert with a sigmoid gate, qkv bias,
        # no top-k renormalisation
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_act": "silu",
        "hidden_size": 64, "intermediate_size": 160, "moe_intermediate_size": 48, "shared_expert_intermediate_size": 96,
        "num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": False, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "router_aux_loss_coef": 0.001, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": False, "qkv_bias": True, "use_sliding_window": False, "attention_dropout": 0.0,
    },
}


def toy_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOY_TOKENIZER_DIR))


def tiny_config_dict(family: str, vocab_size: int, **overrides) -> dict:
    if family not in FAMILY_CONFIGS:
        raise ValueError(f"unknown tiny model family {family!r}; choose one of {sorted(FAMILY_CONFIGS)}")
    tok = json.loads((TOY_TOKENIZER_DIR / "tokenizer_config.json").read_text())
    cfg = {**FAMILY_CONFIGS[family], "vocab_size": vocab_size, "torch_dtype": "float32",
           "bos_token_id": tok["bos_token_id"], "eos_token_id": tok["eos_token_id"], **overrides}
    return cfg


def make_tiny_hf_model(out_dir, family: str = "qwen2.5", seed: int = 0, vocab_size: int = 128,
                       dtype: torch.dtype = torch.float32, init_std: float = 0.02, **overrides) -> Path:
    """Write a random-init HF checkpoint (config.json, model.safetensors, toy tokenizer) to `out_dir`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config_dict(family, vocab_size, initializer_range=init_std, **overrides)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Norm weights of a trained model are not all ones; perturb them so conversion tests catch swapped norms.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out_dir, safe_serialization=True)
    for f in TOY_TOKENIZER_DIR.iterdir():
        shutil.copy(f, out_dir / f.name)
    return out_dir


def sft_step(model, tokenizer, optimizer, prompts: list, texts: list) -> torch.Tensor:
    """One supervised step on `texts` (each its prompt + a target): the loss covers only what follows each prompt,
    padding excluded. The warm starts of `make demo` and tools/ablation.py; returns the loss."""
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    labels = enc.input_ids.clone()
    for i, p in enumerate(prompts):
        labels[i, :len(tokenizer(p).input_ids)] = -100
    labels[enc.attention_mask == 0] = -100
    loss = model(**enc, labels=labels).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss
