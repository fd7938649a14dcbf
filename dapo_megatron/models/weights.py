"""The one HF <-> Megatron weight mapping (used by the model loader, the conversion tools and weight sync).

Megatron layouts handled here:
- fused QKV: rows grouped per query group as [q heads of the group, k, v] (GQA interleaving), bias likewise;
- SwiGLU fc1: [gate; up] per tensor-parallel shard (shard r = [gate_r; up_r]);
- column-parallel weights split on dim 0, row-parallel (linear_proj, linear_fc2) on dim 1, norms replicated;
- Transformer Engine names fuse the pre-attention/pre-MLP norms into linear_qkv / linear_fc1 (`layer_norm_weight`).
- vocabulary padding (Megatron-LM's make_vocab_size_divisible_by): the embedding and output layer carry zero rows
  past the real vocabulary; `to_megatron` appends them, `to_hf` strips them, so HF tensors always have vocab_size rows.
Names below use *global* layer indices; `local_to_global_names` translates a pipeline stage's module names.
"""
import re
from typing import Callable, Iterator

import torch

from . import moe as moe_lib
from .hf_config import ModelArch

_TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")

# Megatron per-layer suffix -> (HF per-layer suffixes, tensor-parallel split dim or None)
_LAYER_MAP = {
    "input_layernorm.weight": (("input_layernorm.weight",), None),
    "self_attention.linear_qkv.weight": (("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                          "self_attn.v_proj.weight"), 0),
    "self_attention.linear_qkv.bias": (("self_attn.q_proj.bias", "self_attn.k_proj.bias",
                                        "self_attn.v_proj.bias"), 0),
    "self_attention.q_layernorm.weight": (("self_attn.q_norm.weight",), None),
    "self_attention.k_layernorm.weight": (("self_attn.k_norm.weight",), None),
    "self_attention.linear_proj.weight": (("self_attn.o_proj.weight",), 1),
    "pre_mlp_layernorm.weight": (("post_attention_layernorm.weight",), None),
    "mlp.linear_fc1.weight": (("mlp.gate_proj.weight", "mlp.up_proj.weight"), 0),
    "mlp.linear_fc2.weight": (("mlp.down_proj.weight",), 1),
}
_GLOBAL_MAP = {
    "embedding.word_embeddings.weight": ("model.embed_tokens.weight", 0),
    "decoder.final_layernorm.weight": ("model.norm.weight", None),
    "output_layer.weight": ("lm_head.weight", 0),
}


def canonical_name(name: str) -> str:
    """Strip DDP/Float16 wrappers' `module.` prefixes and map TE fused-norm names to the local-spec names."""
    while name.startswith("module."):
        name = name[len("module."):]
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _TE_ALIASES:
        return f"decoder.layers.{m.group(1)}.{_TE_ALIASES[m.group(2)]}"
    return moe_lib.canonical_moe_name(name)


def _layer_suffixes(arch: ModelArch, i: int) -> list[str]:
    if arch.moe is None or not arch.moe.is_moe_layer(i):
        return list(_LAYER_MAP)
    return [s for s in _LAYER_MAP if not s.startswith("mlp.")] + moe_lib.layer_suffixes(arch.moe, i)


def megatron_param_names(arch: ModelArch) -> list[str]:
    """All Megatron parameter names (global layer indices, local-spec naming) of a full model."""
    names = ["embedding.word_embeddings.weight"]
    for i in range(arch.num_layers):
        for suffix in _layer_suffixes(arch, i):
            if suffix.endswith("qkv.bias") and not arch.qkv_bias:
                continue
            if "_layernorm" in suffix and suffix.startswith("self_attention.") and not arch.qk_layernorm:
                continue
            names.append(f"decoder.layers.{i}.{suffix}")
    names.append("decoder.final_layernorm.weight")
    if not arch.tie_word_embeddings:
        names.append("output_layer.weight")
    return names


def hf_names_for(name: str, arch: ModelArch) -> tuple[str, ...]:
    """HF tensors that make up Megatron parameter `name` (global naming)."""
    name = canonical_name(name)
    if name in _GLOBAL_MAP:
        if name == "output_layer.weight" and arch.tie_word_embeddings:
            return ("model.embed_tokens.weight",)
        return (_GLOBAL_MAP[name][0],)
    m = _LAYER_RE.match(name)
    hf = m and (_LAYER_MAP[m.group(2)][0] if m.group(2) in _LAYER_MAP else moe_lib.hf_suffixes(m.group(2)))
    if not hf:
        raise KeyError(f"no Hugging Face mapping for Megatron parameter {name!r}")
    return tuple(f"model.layers.{m.group(1)}.{s}" for s in hf)


def tp_split_dim(name: str):
    name = canonical_name(name)
    if name in _GLOBAL_MAP:
        return _GLOBAL_MAP[name][1]
    suffix = _LAYER_RE.match(name).group(2)
    return _LAYER_MAP[suffix][1] if suffix in _LAYER_MAP else moe_lib.split_dim(suffix)


def _qkv_to_megatron(q, k, v, arch: ModelArch):
    groups, d = arch.num_query_groups, arch.kv_channels
    per = arch.num_attention_heads // groups
    rest = q.shape[1:]
    q = q.reshape(groups, per * d, *rest)
    k = k.reshape(groups, d, *rest)
    v = v.reshape(groups, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def _qkv_from_megatron(qkv, arch: ModelArch):
    groups, d = arch.num_query_groups, arch.kv_channels
    per = arch.num_attention_heads // groups
    rest = qkv.shape[1:]
    qkv = qkv.reshape(groups, (per + 2) * d, *rest)
    q, k, v = torch.split(qkv, [per * d, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def to_megatron(name: str, hf_tensors: tuple[torch.Tensor, ...], arch: ModelArch, tp_size: int = 1,
                tp_rank: int = 0, padded_vocab: int | None = None) -> torch.Tensor:
    """The tensor-parallel shard `tp_rank` of Megatron parameter `name`, built from its HF tensors.

    `padded_vocab`: rows of the (full) embedding / output layer; zero rows are appended past vocab_size.
    """
    name = canonical_name(name)
    dim = tp_split_dim(name)
    if name.endswith("linear_qkv.weight") or name.endswith("linear_qkv.bias"):
        full = _qkv_to_megatron(*hf_tensors, arch)
    elif name.endswith("linear_fc1.weight"):
        gate, up = (t.chunk(tp_size, dim=0)[tp_rank] for t in hf_tensors)
        return torch.cat([gate, up], dim=0).contiguous()
    else:
        (full,) = hf_tensors
    if name in VOCAB_PARAMS and padded_vocab is not None and padded_vocab != full.shape[0]:
        if padded_vocab < full.shape[0]:
            raise ValueError(f"{name}: padded vocabulary {padded_vocab} < {full.shape[0]} rows")
        full = torch.cat([full, full.new_zeros(padded_vocab - full.shape[0], *full.shape[1:])])
    if dim is None or tp_size == 1:
        return full.contiguous()
    if full.shape[dim] % tp_size:
        raise ValueError(f"{name}: dim {dim} of size {full.shape[dim]} is not divisible by TP={tp_size}")
    return full.chunk(tp_size, dim=dim)[tp_rank].contiguous()


def row_concat_sources(name: str, arch: ModelArch) -> tuple[str, ...] | None:
    """HF tensors whose rows, concatenated (then zero rows up to the padded vocabulary), are the TP=1 Megatron
    parameter `name`, or None where `to_megatron` does more than that (the fused QKV interleaves its heads).

    The converter reads such a parameter's chunks straight from the HF files into their place, with no copy.
    """
    name = canonical_name(name)
    if name.endswith("linear_qkv.weight") or name.endswith("linear_qkv.bias"):
        return None
    return hf_names_for(name, arch)


def to_hf(name: str, shards: list[torch.Tensor], arch: ModelArch) -> dict[str, torch.Tensor]:
    """HF tensors of Megatron parameter `name` from its tensor-parallel shards (in TP-rank order)."""
    name = canonical_name(name)
    dim = tp_split_dim(name)
    hf_names = hf_names_for(name, arch)
    if name == "output_layer.weight" and arch.tie_word_embeddings:
        return {}  # tied: the embedding carries it
    if name.endswith("linear_fc1.weight"):
        halves = [s.chunk(2, dim=0) for s in shards]
        gate = _cat([h[0] for h in halves], dim=0)
        up = _cat([h[1] for h in halves], dim=0)
        return dict(zip(hf_names, (gate, up)))
    full = shards[0] if dim is None else _cat(shards, dim=dim)
    if name in VOCAB_PARAMS:
        full = full[:arch.vocab_size]  # strip the padding rows
    if name.endswith("linear_qkv.weight") or name.endswith("linear_qkv.bias"):
        return dict(zip(hf_names, _qkv_from_megatron(full, arch)))
    return {hf_names[0]: full}


def _cat(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    # One shard (TP=1, conversion): a view, not a copy of what may be the largest tensor of the model.
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


def expected_hf_names(arch: ModelArch) -> set[str]:
    names = set()
    for n in megatron_param_names(arch):
        names.update(hf_names_for(n, arch))
    return names


def local_to_global_names(model) -> dict[str, str]:
    """Map a pipeline stage's local parameter names to global-layer names (layer_number is 1-based, global)."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    offsets = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, TransformerLayer):
            offsets[canonical_name(mod_name)] = f"decoder.layers.{mod.layer_number - 1}"
    out = {}
    for name, _ in model.named_parameters():
        c = canonical_name(name)
        m = re.match(r"^(decoder\.layers\.\d+)\.(.+)$", c)
        out[name] = canonical_name(f"{offsets[m.group(1)]}.{m.group(2)}") if m else c
    return moe_lib.globalize_expert_names(model, out)  # expert-parallel ranks hold experts [r*n_local, ...)


@torch.no_grad()
def load_hf_weights(model, arch: ModelArch, get_hf: Callable[[str], torch.Tensor]) -> None:
    """Copy HF weights into this rank's Megatron module (any TP/PP stage). `get_hf(name)` returns one HF tensor."""
    params = dict(model.named_parameters())
    for local, global_name in local_to_global_names(model).items():
        tp_size, tp_rank, _ = moe_lib.shard_coords(global_name)  # expert-TP for experts, TP otherwise
        p = params[local]
        padded = p.shape[0] * tp_size if global_name in VOCAB_PARAMS else None
        shard = to_megatron(global_name, tuple(get_hf(n) for n in hf_names_for(global_name, arch)), arch,
                            tp_size, tp_rank, padded_vocab=padded)
        if p.shape != shard.shape:
            raise ValueError(f"shape mismatch for {global_name}: model {tuple(p.shape)} vs checkpoint "
                             f"{tuple(shard.shape)}; is config.json the one the weights were saved with?")
        p.copy_(shard.to(p.dtype))


@torch.no_grad()
def iter_hf_weights(model, arch: ModelArch) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (hf_name, full tensor) for this pipeline stage, gathering tensor-parallel shards on every TP rank."""
    import torch.distributed as dist

    names = local_to_global_names(model)
    for local, p in model.named_parameters():
        global_name = names[local]
        if global_name == "output_layer.weight" and arch.tie_word_embeddings:
            continue
        data = p.detach()
        tp_size, _, group = moe_lib.shard_coords(global_name)
        if tp_split_dim(global_name) is None or tp_size == 1:
            shards = [data]
        else:
            shards = [torch.empty_like(data) for _ in range(tp_size)]
            dist.all_gather(shards, data.contiguous(), group=group)
        if moe_lib.is_expert_param(global_name):  # every rank yields every expert
            for name, full in moe_lib.gather_experts(global_name, to_hf(global_name, shards, arch),
                                                          arch.moe.num_experts):
                yield name, full
            continue
        yield from to_hf(global_name, shards, arch).items()


def safetensors_getter(hf_dir) -> Callable[[str], torch.Tensor]:
    """A `get_hf(name)` reading tensors one at a time from a (sharded) safetensors HF folder.

    The folder is checked up front (index, shard files, truncation) by hf_io's reader, shared with the converter.
    """
    from .hf_io import HFCheckpointReader

    return HFCheckpointReader(hf_dir).get


def expected_hf_shapes(arch: ModelArch) -> dict[str, tuple[int, ...]]:
    """Shape of every HF tensor of a model described by `arch` (the names of `expected_hf_names`)."""
    h, f, d, v = arch.hidden_size, arch.ffn_hidden_size, arch.kv_channels, arch.vocab_size
    q, kv = arch.num_attention_heads * d, arch.num_query_groups * d
    per_layer = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
        "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,),
        "self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,), "self_attn.o_proj.weight": (h, q),
        "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f),
    }
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    if arch.moe is not None:
        per_layer.update(moe_lib.hf_shapes(arch.moe, h))
    out = {}
    for name in expected_hf_names(arch):
        m = re.match(r"^model\.layers\.\d+\.(.+)$", name)
        out[name] = per_layer[moe_lib.hf_shape_key(m.group(1))] if m else shapes[name]
    return out
