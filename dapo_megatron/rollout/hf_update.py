"""Receiving a weight update on the embedded engine: names and shapes checked against the served model before anything
is copied (all-or-nothing), then copied in place; Hugging Face names, fused MoE experts through per-expert views."""
import json
from pathlib import Path
from typing import Iterable

import torch

_ARCH_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
              "intermediate_size")


def check_same_architecture(config, folder):
    """Refuse a weight folder whose config.json describes a different architecture than `config`."""
    cfg_file = Path(folder) / "config.json"
    if not cfg_file.is_file():
        return
    new = json.loads(cfg_file.read_text())
    for key in _ARCH_KEYS:
        if key in new and new[key] != getattr(config, key, new[key]):
            raise ValueError(f"{cfg_file}: {key}={new[key]} differs from the served model's "
                             f"{getattr(config, key)}; a weight update cannot change the architecture")


def _hf_targets(model) -> dict:
    """HF name -> tensor to copy into: the parameters, plus per-expert views of fused MoE experts (models/moe.py)."""
    from ..models.moe import hub_expert_views

    return {**dict(model.named_parameters(remove_duplicate=False)), **hub_expert_views(model)}


def check_hf_update(model, named_shapes: Iterable, source: str, *, require_all: bool = False):
    """Check names and shapes of an update against `model` before anything is copied (all-or-nothing)."""
    params = _hf_targets(model)
    covered = set()
    for name, shape in named_shapes:
        if name not in params:
            raise ValueError(f"{source}: unknown parameter {name!r}; expected Hugging Face names such as "
                             f"{next(iter(params))!r}")
        if tuple(params[name].shape) != tuple(shape):
            raise ValueError(f"{source}: {name!r} has shape {tuple(shape)}, the served model has "
                             f"{tuple(params[name].shape)}")
        covered.add(params[name].untyped_storage().data_ptr())  # an expert view covers its fused tensor
    missing = [n for n, p in model.named_parameters() if p.untyped_storage().data_ptr() not in covered]
    if require_all and missing:
        raise ValueError(f"{source} lacks {len(missing)} parameters of the served model, e.g. {missing[:3]}")


def copy_hf_tensors(model, named_tensors: Iterable):
    params = _hf_targets(model)
    with torch.no_grad():
        for name, tensor in named_tensors:
            params[name].copy_(tensor)
