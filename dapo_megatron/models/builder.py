"""Build a megatron-core GPTModel from a Hugging Face config."""
from dataclasses import dataclass
from typing import Optional

import torch

from .hf_config import ModelArch, arch_from_hf, check_parallel_sizes, load_hf_config, transformer_config_kwargs


@dataclass
class ModelConfig:
    path: str = ""  # HF folder (config.json + weights) or a folder holding config.json only
    fp8: Optional[str] = None  # null | e4m3 | hybrid (GPU + Transformer Engine only)
    fp8_recipe: str = "delayed"  # delayed | current


def layer_spec(arch: ModelArch, on_gpu: bool, fp8: Optional[str]):
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if on_gpu:
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_layernorm, fp8=fp8)
    from .packed_attention import PackedDotProductAttention

    spec = get_gpt_layer_local_spec(qk_layernorm=arch.qk_layernorm, normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = PackedDotProductAttention  # THD on CPU
    return spec


def build_gpt_model(arch: ModelArch, *, pre_process: bool = True, post_process: bool = True,
                    fp8: Optional[str] = None, fp8_recipe: str = "delayed", on_gpu: Optional[bool] = None,
                    vp_stage: Optional[int] = None, config_overrides: Optional[dict] = None):
    """One pipeline stage of the model, sharded for the current tensor-parallel rank.

    `config_overrides`: extra TransformerConfig fields of the trainer (activation recompute), applied last.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    check_parallel_sizes(arch, tp, pp)
    config = TransformerConfig(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        **{**transformer_config_kwargs(arch, on_gpu=on_gpu, fp8=fp8, fp8_recipe=fp8_recipe),
           **(config_overrides or {})},
    )
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(arch, on_gpu, fp8),
        vocab_size=arch.vocab_size,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rotary_base) if float(arch.rotary_base).is_integer() else arch.rotary_base,
        rope_scaling=arch.rope_scaling_factor is not None,
        rope_scaling_factor=arch.rope_scaling_factor or 8.0,
        vp_stage=vp_stage,
    )


def build_model(cfg: ModelConfig, *, wrap_ddp: bool = False, config_overrides: Optional[dict] = None):
    """The local pipeline stage of the model described by `cfg.path`'s config.json (parallel state must be up)."""
    from megatron.core import parallel_state

    arch = arch_from_hf(load_hf_config(cfg.path))
    model = build_gpt_model(
        arch,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        fp8=cfg.fp8,
        fp8_recipe=cfg.fp8_recipe,
        config_overrides=config_overrides,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model, arch
