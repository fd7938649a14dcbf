"""Build a megatron-core GPTModel from a Hugging Face config."""
from dataclasses import dataclass
from typing import Optional

import torch

from . import moe as moe_lib
from . import norms
from .hf_config import (
    ModelArch,
    arch_from_hf,
    check_parallel_sizes,
    load_hf_config,
    padded_vocab_size,
    transformer_config_kwargs,
)


@dataclass
class ModelConfig:
    path: str = ""  # HF folder (config.json + weights) or a folder holding config.json only
    fp8: Optional[str] = None  # null | e4m3 | hybrid (GPU + Transformer Engine only)
    fp8_recipe: str = "delayed"  # delayed | current
    # Mixture-of-experts overrides (models/moe.py MoEOptions); null = what the HF config / the device says.
    moe_aux_loss_coeff: Optional[float] = None  # load-balancing loss weight; default HF router_aux_loss_coef
    moe_router_load_balancing_type: str = "aux_loss"  # aux_loss | seq_aux_loss | none
    moe_z_loss_coeff: Optional[float] = None  # router z-loss weight; off by default
    moe_expert_capacity_factor: Optional[float] = None  # null: drop-less; a number drops tokens over capacity
    moe_token_drop_policy: str = "probs"  # probs | position (with a capacity factor)
    moe_token_dispatcher_type: Optional[str] = None  # alltoall (default) | allgather
    moe_grouped_gemm: Optional[bool] = None  # default: TE grouped GEMM on GPU, sequential experts on CPU
    moe_router_dtype: Optional[str] = None  # null (model dtype) | fp32 | fp64
    moe_router_score_function: str = "softmax"  # Qwen routers are softmax; anything else is refused
    # Megatron-LM's vocabulary padding: the embedding / output layer have ceil(V / (this x TP)) x this x TP rows
    make_vocab_size_divisible_by: int = 128


def layer_spec(arch: ModelArch, on_gpu: bool, fp8: Optional[str], config=None, vp_stage=None):
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    if arch.moe is not None:
        block = moe_lib.decoder_block_spec(config, on_gpu, vp_stage)
        for spec in ([] if on_gpu else block.layer_specs):
            _packed_core_attention(spec)
        return block
    if on_gpu:
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_layernorm, fp8=fp8)
    spec = _packed_core_attention(get_gpt_layer_local_spec(qk_layernorm=arch.qk_layernorm, normalization="RMSNorm"))
    if config is None or not config.sequence_parallel:
        return spec
    # CPU + SP: torch's norm on the sequence shard, weights tagged for the TP gradient sum (models/norms.py); the
    # block's final norm too, so the spec is a whole block's
    spec = norms.sequence_parallel_layer_spec(spec)
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config, vp_stage),
                                      layer_norm=norms.SequenceParallelRMSNorm)


def _packed_core_attention(spec):
    """CPU: the local layer spec with padding-free (THD) core attention (models/packed_attention.py)."""
    from .packed_attention import PackedDotProductAttention

    spec.submodules.self_attention.submodules.core_attention = PackedDotProductAttention
    return spec


def build_gpt_model(arch: ModelArch, *, pre_process: bool = True, post_process: bool = True,
                    fp8: Optional[str] = None, fp8_recipe: str = "delayed", on_gpu: Optional[bool] = None,
                    vp_stage: Optional[int] = None, moe_options: Optional[moe_lib.MoEOptions] = None,
                    make_vocab_size_divisible_by: int = 128, padded_vocab: Optional[int] = None,
                    config_overrides: Optional[dict] = None, sequence_parallel: Optional[bool] = None):
    """One pipeline stage of the model, sharded for the current tensor-parallel rank.

    `sequence_parallel`: None = what `parallel.initialize` resolved (parallel.sequence_parallel; default on at
    TP > 1). Sequence parallelism changes activations only: the parameters, their names and shapes are the same.

    The vocabulary is padded to `padded_vocab` rows, by default Megatron-LM's size for this TP.
    `config_overrides`: extra TransformerConfig fields of the trainer (activation recompute), applied last.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from .. import parallel

    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    tp = parallel_state.get_tensor_model_parallel_world_size()
    sp = (parallel.sequence_parallel() if sequence_parallel is None else sequence_parallel) and tp > 1
    if arch.moe is not None:
        sp = tp > 1  # megatron-core trains MoE layers at TP > 1 only with SP (check_supported refuses false)
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    ep = parallel_state.get_expert_model_parallel_world_size()
    etp = parallel_state.get_expert_tensor_parallel_world_size()
    check_parallel_sizes(arch, tp, pp, ep, etp)
    if padded_vocab is None:
        padded_vocab = padded_vocab_size(arch.vocab_size, make_vocab_size_divisible_by, tp)
    if padded_vocab < arch.vocab_size or padded_vocab % tp:
        raise ValueError(f"padded vocabulary {padded_vocab} must be >= vocab_size={arch.vocab_size} and divisible "
                         f"by TP={tp}")
    config = TransformerConfig(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        **{**transformer_config_kwargs(arch, on_gpu=on_gpu, fp8=fp8, fp8_recipe=fp8_recipe, moe_options=moe_options,
                                       tp=tp),
           "sequence_parallel": sp,
           **(config_overrides or {})},
    )
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(arch, on_gpu, fp8, config, vp_stage),
        vocab_size=padded_vocab,
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
        moe_options=moe_lib.options_of(cfg),
        make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by,
        config_overrides=config_overrides,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model, arch
