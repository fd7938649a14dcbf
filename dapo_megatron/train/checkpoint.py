"""Checkpoints: megatron dist_checkpointing of model + optimizer, trainer state, RNG; atomic folders; `latest`.

Layout (shared with tools/convert_*): ROOT/latest names the newest complete ROOT/iter_{N:07d}/, which holds
model/ (torch_dist), optim/ (torch_dist), trainer_state.json and rng/rank{r}.pt. A folder is written as
iter_N.tmp and renamed only after every rank has finished, so a crash never leaves a half checkpoint behind a name
that `latest` or `find_latest` would pick.
"""
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

LATEST = "latest"


def iter_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def find_latest(root) -> Optional[Path]:
    """The newest complete checkpoint folder under `root`, or None when there is none."""
    root = Path(root)
    marker = root / LATEST
    if marker.is_file():
        path = root / marker.read_text().strip()
        if (path / "model").is_dir():
            return path
        raise FileNotFoundError(f"{marker} names {path.name}, which is missing or incomplete; "
                                f"point `latest` at a complete iter_* folder or remove it")
    return None


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def save_checkpoint(root, iteration: int, actor, trainer_state: dict, hf_config_dir=None, keep_last: int = 0) -> Path:
    """Collective: every rank calls it. Returns the final folder."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = root / iter_name(iteration)
    tmp = root / (iter_name(iteration) + ".tmp")
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "model").mkdir(parents=True)
        (tmp / "optim").mkdir()
        (tmp / "rng").mkdir()
    dist.barrier()
    module = actor.model.module
    # Build both before saving: save() rewrites the state dict it is given in place.
    model_sd = module.sharded_state_dict()
    optim_sd = actor.optimizer.sharded_state_dict(module.sharded_state_dict())
    dist_checkpointing.save(model_sd, str(tmp / "model"))
    dist_checkpointing.save(optim_sd, str(tmp / "optim"))
    torch.save(_rng_state(), tmp / "rng" / f"rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        state = {**trainer_state, "iteration": iteration, "scheduler": actor.scheduler.state_dict(),
                 "world_size": dist.get_world_size()}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1, default=float))
        if hf_config_dir is not None and not (root / "hf_config").exists():
            _copy_hf_config(hf_config_dir, root / "hf_config")
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _write_text_atomic(root / LATEST, final.name)
        if keep_last > 0:
            _prune(root, keep_last)
    dist.barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    done = sorted(p for p in root.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _copy_hf_config(src, dst: Path) -> None:
    from ..models.hf_io import copy_hf_metadata_files

    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    copy_hf_metadata_files(src, tmp)
    os.rename(tmp, dst)


def load_checkpoint(path, actor, load_optim: bool = True) -> dict:
    """Collective. Loads the model (any TP/PP it was saved at), the optimizer and RNG when present.

    Returns the trainer state ({} for a model-only checkpoint such as one written by the conversion tool).
    """
    from megatron.core import dist_checkpointing

    path = Path(path)
    if not (path / "model").is_dir():
        raise FileNotFoundError(f"{path} is not a checkpoint folder (no model/ inside)")
    module = actor.model.module
    module.load_state_dict(dist_checkpointing.load(module.sharded_state_dict(), str(path / "model")), strict=True)
    state_file = path / "trainer_state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    if load_optim and (path / "optim").is_dir() and state:
        optim_sd = actor.optimizer.sharded_state_dict(module.sharded_state_dict(), is_loading=True)
        actor.optimizer.load_state_dict(dist_checkpointing.load(optim_sd, str(path / "optim")))
        actor.scheduler.load_state_dict(state["scheduler"])
        rng_file = path / "rng" / f"rank{dist.get_rank()}.pt"
        if state.get("world_size") == dist.get_world_size() and rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=False))
    if hasattr(actor.optimizer, "reload_model_params"):
        actor.optimizer.reload_model_params()  # bf16 params from the fp32 main copy (no-op for fp32)
    return state
