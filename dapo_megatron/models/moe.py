"""Mixture-of-experts models (Qwen3-MoE, Qwen2-MoE) on megatron-core's MoE layer.

One place for everything MoE: the HF config -> router/expert settings, the user's `model.moe_*` overrides (each
real or refused), the per-layer spec (mixed dense/MoE layers), and the HF <-> Megatron names of the expert weights.

HF (hub, per-expert layout)                       Megatron (global expert index e, global layer i)
  model.layers.i.mlp.gate.weight                    decoder.layers.i.mlp.router.weight
  model.layers.i.mlp.experts.e.{gate,up}_proj       decoder.layers.i.mlp.experts.local_experts.e.linear_fc1 ([gate; up])
  model.layers.i.mlp.experts.e.down_proj            decoder.layers.i.mlp.experts.local_experts.e.linear_fc2
  model.layers.i.mlp.shared_expert.*                decoder.layers.i.mlp.shared_experts.linear_fc{1,2}
  model.layers.i.mlp.shared_expert_gate.weight      decoder.layers.i.mlp.shared_experts.gate_weight
Transformer Engine's grouped GEMM names experts `mlp.experts.linear_fc1.weight{j}`; `canonical_moe_name` maps them.

Routing: HF computes softmax over all experts, takes the top k and renormalises them when `norm_topk_prob`.
Megatron's `moe_router_pre_softmax=True` is softmax -> top-k (no renormalisation); `False` is top-k -> softmax over
the k logits, which equals the renormalised top-k probabilities. So `moe_router_pre_softmax = not norm_topk_prob`.
"""
import dataclasses
import re
from dataclasses import dataclass, fields
from typing import Optional

from . import norms

_EXPERT_RE = re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts)\.local_experts\.(\d+)\.(linear_fc[12]\.weight)$")
_TE_GROUPED_RE = re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts)\.(linear_fc[12])\.weight(\d+)$")
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_HF_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")

MOE_FAMILIES = {"qwen3_moe", "qwen2_moe"}
DISPATCHERS = ("alltoall", "allgather")
LOAD_BALANCING = ("aux_loss", "seq_aux_loss", "none")


@dataclass(frozen=True)
class MoEArch:
    num_experts: int
    topk: int
    ffn_hidden_size: int  # per expert (HF moe_intermediate_size)
    shared_expert_size: Optional[int]  # None: no shared expert
    shared_expert_gate: bool  # sigmoid gate on the shared expert (Qwen2-MoE)
    norm_topk_prob: bool
    aux_loss_coef: float
    layer_pattern: tuple  # per layer: 1 = MoE, 0 = dense MLP (HF decoder_sparse_step / mlp_only_layers)

    def is_moe_layer(self, i: int) -> bool:
        return bool(self.layer_pattern[i])


def moe_arch_from_hf(cfg: dict, family: str, error) -> Optional[MoEArch]:
    """The MoE record of an HF config (None for dense families); `error` is the exception class to raise."""
    if family not in MOE_FAMILIES:
        return None
    # hub configs say num_experts; transformers 5 save_pretrained writes num_local_experts
    n = int(cfg.get("num_experts", cfg.get("num_local_experts", 0)) or 0)
    k = int(cfg.get("num_experts_per_tok", 0))
    if n <= 0:
        raise error(f"num_experts={n}: a {family} model needs num_experts >= 1")
    if not 1 <= k <= n:
        raise error(f"num_experts_per_tok={k} must be between 1 and num_experts={n}")
    for key in ("scoring_func", "score_function", "topk_method", "n_group", "routed_scaling_factor"):
        if key in cfg and cfg[key] not in (None, "softmax", "greedy", 1, 1.0):
            raise error(f"{key}={cfg[key]!r} is not supported for {family}: its router is a top-k softmax")
    shared = cfg.get("shared_expert_intermediate_size")
    if family == "qwen3_moe":
        if shared or cfg.get("n_shared_experts"):
            raise error(f"shared_expert_intermediate_size={shared}: Qwen3-MoE has no shared expert and the "
                        "converter knows no shared-expert layout for it; remove the field")
        shared = None
    elif not shared or int(shared) <= 0:
        raise error(f"shared_expert_intermediate_size={shared}: Qwen2-MoE needs a shared expert (> 0)")
    layers = int(cfg["num_hidden_layers"])
    step = int(cfg.get("decoder_sparse_step", 1) or 1)
    dense = set(cfg.get("mlp_only_layers") or [])
    if any(not 0 <= i < layers for i in dense):
        raise error(f"mlp_only_layers={sorted(dense)} names layers outside 0..{layers - 1}")
    pattern = tuple(int(i not in dense and (i + 1) % step == 0) for i in range(layers))
    return MoEArch(num_experts=n, topk=k, ffn_hidden_size=int(cfg["moe_intermediate_size"]),
                   shared_expert_size=int(shared) if shared else None, shared_expert_gate=family == "qwen2_moe",
                   norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
                   aux_loss_coef=float(cfg.get("router_aux_loss_coef", 0.0) or 0.0), layer_pattern=pattern)


# ---------------------------------------------------------------- user overrides (model.moe_*)


@dataclass
class MoEOptions:
    """The `model.moe_*` keys. None means: what the HF config / the device says."""

    moe_aux_loss_coeff: Optional[float] = None  # default: HF router_aux_loss_coef
    moe_router_load_balancing_type: str = "aux_loss"  # aux_loss | seq_aux_loss | none
    moe_z_loss_coeff: Optional[float] = None  # router z-loss; off by default
    moe_expert_capacity_factor: Optional[float] = None  # None: drop-less; else tokens beyond capacity are dropped
    moe_token_drop_policy: str = "probs"  # probs | position (only with a capacity factor)
    moe_token_dispatcher_type: Optional[str] = None  # alltoall (default) | allgather
    moe_grouped_gemm: Optional[bool] = None  # default: on with a GPU (TE grouped GEMM), sequential experts on CPU
    moe_router_dtype: Optional[str] = None  # null (model dtype) | fp32 | fp64
    moe_router_score_function: str = "softmax"  # the Qwen routers' function; anything else is refused


def options_of(model_cfg) -> MoEOptions:
    """The MoE options carried by a ModelConfig (its `moe_*` fields)."""
    return MoEOptions(**{f.name: getattr(model_cfg, f.name) for f in fields(MoEOptions) if hasattr(model_cfg, f.name)})


def check_options(opts: MoEOptions, moe: Optional[MoEArch], on_gpu: bool) -> None:
    """Refuse an option that cannot run, naming the key (ValueError, one line)."""
    changed = [f.name for f in fields(MoEOptions) if getattr(opts, f.name) != f.default]
    if moe is None:
        if changed:
            raise ValueError(f"model.{changed[0]} is set but the model has no experts; remove it")
        return
    if opts.moe_router_score_function != "softmax":
        raise ValueError(f"model.moe_router_score_function={opts.moe_router_score_function!r} is not supported: "
                         "Qwen MoE routers are trained with softmax; remove the key")
    if opts.moe_router_load_balancing_type not in LOAD_BALANCING:
        raise ValueError(f"model.moe_router_load_balancing_type={opts.moe_router_load_balancing_type!r}; "
                         f"use one of {', '.join(LOAD_BALANCING)}")
    if opts.moe_token_dispatcher_type not in (None, *DISPATCHERS):
        raise ValueError(f"model.moe_token_dispatcher_type={opts.moe_token_dispatcher_type!r}; "
                         f"use one of {', '.join(DISPATCHERS)}")
    if opts.moe_grouped_gemm and not on_gpu:
        raise ValueError("model.moe_grouped_gemm=true needs a GPU with Transformer Engine; remove it on CPU")
    if opts.moe_router_dtype not in (None, "fp32", "fp64"):
        raise ValueError(f"model.moe_router_dtype={opts.moe_router_dtype!r}; use null, fp32 or fp64")
    if opts.moe_expert_capacity_factor is not None and opts.moe_expert_capacity_factor <= 0:
        raise ValueError(f"model.moe_expert_capacity_factor={opts.moe_expert_capacity_factor} must be > 0 "
                         "(or null for drop-less)")
    if opts.moe_token_drop_policy not in ("probs", "position"):
        raise ValueError(f"model.moe_token_drop_policy={opts.moe_token_drop_policy!r}; use probs or position")
    if opts.moe_expert_capacity_factor is not None and opts.moe_router_load_balancing_type == "none":
        raise ValueError("model.moe_expert_capacity_factor needs moe_router_load_balancing_type aux_loss or "
                         "seq_aux_loss (megatron-core drops tokens only with a load-balancing loss)")
    for key in ("moe_aux_loss_coeff", "moe_z_loss_coeff"):
        if getattr(opts, key) is not None and getattr(opts, key) < 0:
            raise ValueError(f"model.{key}={getattr(opts, key)} must be >= 0")


def check_parallel(moe: Optional[MoEArch], tp: int, ep: int, etp: Optional[int], error) -> None:
    if moe is None:
        if ep > 1:
            raise error(f"expert_model_parallel_size={ep} needs a mixture-of-experts model; set it to 1")
        if etp not in (None, tp):  # megatron's default expert TP is the TP size
            raise error(f"expert_tensor_parallel_size={etp} needs a mixture-of-experts model; remove it")
        return
    if moe.num_experts % ep:
        raise error(f"expert_model_parallel_size={ep} must divide num_experts={moe.num_experts}")
    etp = tp if etp is None else etp
    if moe.ffn_hidden_size % etp:
        raise error(f"expert_tensor_parallel_size={etp} must divide moe_intermediate_size={moe.ffn_hidden_size}")
    if moe.shared_expert_size and moe.shared_expert_size % tp:
        raise error(f"tensor_model_parallel_size={tp} must divide "
                    f"shared_expert_intermediate_size={moe.shared_expert_size}")


def transformer_config_kwargs(moe: MoEArch, opts: MoEOptions, *, on_gpu: bool, tp: int = 1) -> dict:
    """TransformerConfig moe_* fields: HF router settings, then the user's overrides."""
    check_options(opts, moe, on_gpu)
    lb = opts.moe_router_load_balancing_type
    kw = dict(
        num_moe_experts=moe.num_experts,
        moe_router_topk=moe.topk,
        moe_ffn_hidden_size=moe.ffn_hidden_size,
        moe_router_pre_softmax=not moe.norm_topk_prob,
        moe_router_score_function="softmax",
        moe_router_load_balancing_type=lb,
        moe_aux_loss_coeff=0.0 if lb == "none" else (
            moe.aux_loss_coef if opts.moe_aux_loss_coeff is None else opts.moe_aux_loss_coeff),
        moe_z_loss_coeff=opts.moe_z_loss_coeff,
        moe_expert_capacity_factor=opts.moe_expert_capacity_factor,
        moe_token_drop_policy=opts.moe_token_drop_policy,
        moe_token_dispatcher_type=opts.moe_token_dispatcher_type or "alltoall",
        moe_grouped_gemm=on_gpu if opts.moe_grouped_gemm is None else opts.moe_grouped_gemm,
        moe_router_dtype=opts.moe_router_dtype,
        sequence_parallel=tp > 1,  # megatron-core refuses to train an MoE layer at TP > 1 without it
        moe_layer_freq=list(moe.layer_pattern),
        moe_permute_fusion=False,
        moe_router_fusion=False,
    )
    if moe.shared_expert_size:
        kw.update(moe_shared_expert_intermediate_size=moe.shared_expert_size,
                  moe_shared_expert_gate=moe.shared_expert_gate)
    return kw


def decoder_block_spec(config, on_gpu: bool, vp_stage=None):
    """Per-layer specs (dense or MoE from config.moe_layer_freq) for this pipeline stage."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        # megatron-core 0.16.1 without Transformer Engine never defines it, and the router's gating reads it
        moe_utils.te_general_gemm = None
    if config.sequence_parallel and not on_gpu:
        # torch's norm refuses a sequence-parallel config; build it plain and tag its weights so that
        # finalize_model_grads sums their (sequence-sharded) gradients over the TP group.
        config = dataclasses.replace(config, sequence_parallel=False)
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm",
                                          vp_stage=vp_stage)
        return dataclasses.replace(spec, layer_norm=norms.SequenceParallelRMSNorm,
                                   layer_specs=[norms.sequence_parallel_layer_spec(ls) for ls in spec.layer_specs])
    return get_gpt_decoder_block_spec(config, use_transformer_engine=on_gpu, normalization="RMSNorm",
                                      vp_stage=vp_stage)


# ---------------------------------------------------------------- weight names


def canonical_moe_name(name: str) -> str:
    """TE grouped-GEMM expert names -> the sequential-experts names used for mapping."""
    m = _TE_GROUPED_RE.match(name)
    return f"{m.group(1)}.local_experts.{m.group(3)}.{m.group(2)}.weight" if m else name


def layer_suffixes(moe: MoEArch, layer: int) -> list[str]:
    """Megatron MLP suffixes of MoE layer `layer` (global expert indices)."""
    out = ["mlp.router.weight"]
    for e in range(moe.num_experts):
        out += [f"mlp.experts.local_experts.{e}.linear_fc1.weight", f"mlp.experts.local_experts.{e}.linear_fc2.weight"]
    if moe.shared_expert_size:
        out += ["mlp.shared_experts.linear_fc1.weight", "mlp.shared_experts.linear_fc2.weight"]
        if moe.shared_expert_gate:
            out.append("mlp.shared_experts.gate_weight")
    return out


def hf_suffixes(suffix: str) -> Optional[tuple]:
    """HF per-layer suffixes of a Megatron MoE suffix, or None when `suffix` is not an MoE weight."""
    if suffix == "mlp.router.weight":
        return ("mlp.gate.weight",)
    m = re.match(r"^mlp\.experts\.local_experts\.(\d+)\.linear_fc([12])\.weight$", suffix)
    if m:
        e = m.group(1)
        return ((f"mlp.experts.{e}.gate_proj.weight", f"mlp.experts.{e}.up_proj.weight") if m.group(2) == "1"
                else (f"mlp.experts.{e}.down_proj.weight",))
    if suffix == "mlp.shared_experts.linear_fc1.weight":
        return ("mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight")
    if suffix == "mlp.shared_experts.linear_fc2.weight":
        return ("mlp.shared_expert.down_proj.weight",)
    if suffix == "mlp.shared_experts.gate_weight":
        return ("mlp.shared_expert_gate.weight",)
    return None


def split_dim(suffix: str):
    """Tensor-parallel split dim of an MoE suffix (router and shared gate are replicated)."""
    if suffix in ("mlp.router.weight", "mlp.shared_experts.gate_weight"):
        return None
    return 0 if suffix.endswith("linear_fc1.weight") else 1


def is_expert_param(name: str) -> bool:
    return bool(_EXPERT_RE.match(canonical_moe_name(name)))


def hf_shapes(moe: MoEArch, hidden: int) -> dict:
    """HF per-layer suffix -> shape, for the MoE tensors (suffix patterns use expert index 'E')."""
    f, s = moe.ffn_hidden_size, moe.shared_expert_size
    out = {"mlp.gate.weight": (moe.num_experts, hidden), "mlp.experts.E.gate_proj.weight": (f, hidden),
           "mlp.experts.E.up_proj.weight": (f, hidden), "mlp.experts.E.down_proj.weight": (hidden, f)}
    if s:
        out.update({"mlp.shared_expert.gate_proj.weight": (s, hidden), "mlp.shared_expert.up_proj.weight": (s, hidden),
                    "mlp.shared_expert.down_proj.weight": (hidden, s), "mlp.shared_expert_gate.weight": (1, hidden)})
    return out


def hf_shape_key(suffix: str) -> str:
    return re.sub(r"^mlp\.experts\.\d+\.", "mlp.experts.E.", suffix)


def unknown_layout_hint(names) -> Optional[str]:
    """A one-line reason when HF tensor names use an expert layout the converter does not know."""
    for n in names:
        if re.search(r"\.mlp\.experts\.(gate_up_proj|down_proj)$", n):
            return (f"{n!r} is the fused in-memory expert layout; save the model with transformers' "
                    "save_pretrained (hub per-expert layout `mlp.experts.{e}.gate_proj.weight`)")
        if re.search(r"\.mlp\.shared_experts\.", n):
            return (f"{n!r}: the `shared_experts` (plural) layout is not a Qwen2-MoE layout; the converter knows "
                    "`mlp.shared_expert.*` + `mlp.shared_expert_gate.weight`")
    return None


def globalize_expert_names(model, names: dict) -> dict:
    """Rewrite local expert indices of `names` (param -> global-layer name) to global expert indices."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    local_to_global = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, MoELayer):
            local_to_global[mod_name] = list(mod.local_expert_indices)
    if not local_to_global:
        return names
    out = {}
    for local, global_name in names.items():
        c = canonical_moe_name(global_name)
        m = _EXPERT_RE.match(c)
        if m:
            prefix = _module_prefix(local)
            idx = local_to_global[prefix][int(_local_expert_index(local))]
            c = f"{m.group(1)}.local_experts.{idx}.{m.group(3)}"
        out[local] = c
    return out


def _module_prefix(param_name: str) -> str:
    # `...mlp.experts.local_experts.3.linear_fc1.weight` or `...mlp.experts.linear_fc1.weight3` -> `...mlp`
    return param_name[:param_name.index(".experts.")]


def _local_expert_index(param_name: str) -> str:
    m = re.search(r"\.local_experts\.(\d+)\.", param_name) or re.search(r"linear_fc[12]\.weight(\d+)$", param_name)
    return m.group(1)


def shard_coords(name: str):
    """(size, rank, group) of the tensor-parallel split of parameter `name`: expert-TP for experts, TP otherwise."""
    from megatron.core import parallel_state as ps

    if is_expert_param(name):
        return (ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank(),
                ps.get_expert_tensor_parallel_group())
    return (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(),
            ps.get_tensor_model_parallel_group())


def gather_experts(global_name: str, hf_tensors: dict, num_experts: int):
    """(HF name, tensor) of expert `global_name`'s counterparts on every expert-parallel rank (collective)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    ep = ps.get_expert_model_parallel_world_size()
    if ep == 1:
        yield from hf_tensors.items()
        return
    rank, group = ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_group()
    m = _EXPERT_RE.match(global_name)
    mine = int(m.group(2))
    for hf_name, t in hf_tensors.items():
        parts = [torch.empty_like(t) for _ in range(ep)]
        dist.all_gather(parts, t.contiguous(), group=group)
        hm = _HF_EXPERT_RE.match(hf_name)
        n_local = num_experts // ep
        j = mine - rank * n_local
        for r, part in enumerate(parts):
            yield f"model.layers.{hm.group(1)}.mlp.experts.{r * n_local + j}.{hm.group(3)}_proj.weight", part



def hub_expert_views(model) -> dict:
    """Hub per-expert names -> views into an in-memory transformers MoE model's fused expert tensors.

    transformers 5 holds experts fused (`mlp.experts.gate_up_proj` [E, 2F, H], `mlp.experts.down_proj` [E, H, F])
    while checkpoints and our weight sync use `mlp.experts.{e}.{gate,up,down}_proj.weight`.
    """
    out = {}
    for name, p in model.named_parameters():
        m = re.match(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$", name)
        if not m:
            continue
        data = p.data
        for e in range(data.shape[0]):
            if m.group(2) == "down_proj":
                out[f"{m.group(1)}.{e}.down_proj.weight"] = data[e]
            else:
                gate, up = data[e].chunk(2, dim=0)
                out[f"{m.group(1)}.{e}.gate_proj.weight"] = gate
                out[f"{m.group(1)}.{e}.up_proj.weight"] = up
    return out
