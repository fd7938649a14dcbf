"""Checkpoints: megatron dist_checkpointing of model + optimizer, trainer state, RNG; atomic folders; `latest`.

The folder layout and the integrity rules (manifest written last, kinds, lineage) live in `ckpt_layout`. A save is
written as ROOT/iter_N.tmp, sealed with its manifest, renamed to iter_N, and only then named by `latest`. A failed
save (a full disk, say) removes its .tmp and raises one line; the previous checkpoint stays as it was.
"""
import errno
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from ..models import ckpt_layout as layout
from ..models.ckpt_layout import CheckpointError
from .faults import fault

LATEST = layout.LATEST
iter_name = layout.iter_name
# The distributed optimizer's state as each DP rank holds it (Megatron-LM's default: parallel writes, no gather; it
# reshards across DP sizes). megatron-core's own default, fully_sharded_model_space, fails to save in 0.16 and 0.19
# ("ShardedTensor.flattened_range is not supported"); fully_reshardable fails to load without Transformer Engine
# (KeyError 'step', measured on 0.16.1 CPU). The plain optimizer ignores it.
OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def find_latest(root) -> Optional[Path]:
    """The newest complete checkpoint folder under `root`, or None when there is none (see ckpt_layout)."""
    if not layout.iteration_dirs(root):
        return None
    return layout.newest_complete(root)[0]


def resume_line(load, path: Path, manifest: dict) -> str:
    """The one line a resume prints (rank 0): folder, step, kind, and why this folder (as Megatron-LM prints the
    checkpoint it loads). `load` is trainer.load; `path`, `manifest` what ckpt_layout.resolve chose."""
    load, path = Path(load), Path(path)
    if layout.is_checkpoint_dir(load):
        why = "pinned by trainer.load"
    elif layout.read_latest(load) == path.name:
        why = f"named by {load / LATEST}"
    elif layout.iteration_dirs(load)[0].name == path.name:
        why = f"the newest complete one ({load / LATEST} missing or unreadable)"
    else:
        why = "the newest complete one, after a fallback from a damaged newer checkpoint"
    kind = manifest["kind"]
    step = manifest.get("iteration", 0) if kind == layout.KIND_TRAIN else 0
    extra = "; model-only: initial weights, fresh optimizer, step 0" if kind == layout.KIND_MODEL else ""
    return f"resuming from {path} (step {step}, kind {kind}): {why}{extra}"


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
    """Collective: every rank calls it. Returns the final folder. Its parent in the run's lineage is `latest`."""
    root = Path(root)
    final = root / iter_name(iteration)
    tmp = root / (iter_name(iteration) + ".tmp")
    rank = dist.get_rank()
    try:
        _write(root, tmp, iteration, actor, trainer_state, hf_config_dir, rank)
    except BaseException as e:  # torch.distributed.checkpoint's CheckpointException is a BaseException
        # torch's zip writer reports a full disk as "RuntimeError: unexpected pos": look at the free space too
        os_error = _find_os_error(e) or (OSError(errno.ENOSPC, "disk full") if _short_write(e) or _disk_full(root)
                                         else None)
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written for a later resume to find
        if os_error is None:
            raise
        raise CheckpointError(_save_failure(root, iteration, os_error)) from e
    if rank == 0:
        if final.exists():  # only a folder that a resume already moved aside could be here: never overwrite
            raise CheckpointError(f"{final} already exists; move it away (it is not from this run's lineage)")
        os.rename(tmp, final)
        fault("save_latest", iteration)
        layout.write_latest(root, final.name)
        if keep_last > 0:
            layout.prune(root, keep_last)
    dist.barrier()
    return final


def _find_os_error(e: BaseException, depth: int = 0) -> Optional[OSError]:
    """The OSError behind `e`: itself, its cause/context, or (torch.distributed.checkpoint) one of its failures."""
    if e is None or depth > 8:
        return None
    if isinstance(e, OSError):
        return e
    failures = [f[0] if isinstance(f, tuple) else f for f in (getattr(e, "failures", None) or {}).values()]
    for inner in [e.__cause__, e.__context__, *failures]:
        if isinstance(inner, BaseException) and (found := _find_os_error(inner, depth + 1)) is not None:
            return found
    return None


def _short_write(e: BaseException, depth: int = 0) -> bool:
    """torch's zip writer ("unexpected pos N vs M") and dist checkpoint workers report ENOSPC as a short write."""
    if e is None or depth > 8:
        return False
    if any(m in str(e) for m in ("unexpected pos", "No space left on device")):
        return True
    failures = [f[0] if isinstance(f, tuple) else f for f in (getattr(e, "failures", None) or {}).values()]
    return any(isinstance(x, BaseException) and _short_write(x, depth + 1)
               for x in [e.__cause__, e.__context__, *failures])


def _disk_full(root: Path) -> bool:
    """Less room left under `root` than the newest checkpoint there takes (or than 1 MiB)."""
    try:
        free = shutil.disk_usage(root).free
        prev = layout.read_latest(root)
        need = sum(f.stat().st_size for f in (root / prev).rglob("*") if f.is_file()) if prev else 0
    except OSError:
        return False
    return free < max(need, 1 << 20)


def _save_failure(root: Path, iteration: int, e: OSError) -> str:
    what = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    prev = layout.read_latest(root)
    kept = f"; the previous checkpoint {prev} is intact" if prev else ""
    return (f"saving checkpoint {iter_name(iteration)} under {root} failed: {what}{kept}; free space there or set "
            "trainer.save to another folder, then resume with trainer.load")


def _write(root: Path, tmp: Path, iteration: int, actor, trainer_state: dict, hf_config_dir, rank: int) -> None:
    from megatron.core import dist_checkpointing

    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a save that died before its manifest: never a checkpoint
        for part in (layout.MODEL_DIR, layout.OPTIM_DIR, layout.RNG_DIR):
            (tmp / part).mkdir(parents=True)
    dist.barrier()
    module = actor.model.module
    # Build both before saving: save() rewrites the state dict it is given in place.
    model_sd = module.sharded_state_dict()
    optim_sd = actor.optimizer.sharded_state_dict(module.sharded_state_dict(), metadata=OPTIM_METADATA)
    # Synchronous torch_dist saves, on purpose: the manifest and the rename below must follow complete files. In
    # megatron-core 0.19 this sync save runs through MCore's async request executed at once and logs "MCore's async
    # save is deprecated ... use NVRx"; NVRx (nvidia-resiliency-ext) is only needed for saving in the background,
    # which we do not do, so the notice is dropped (quiet.py) rather than the save rewritten. Revisit if megatron
    # removes the "mcore" strategy (its own sync save must then change with it) or when background saves are wanted.
    dist_checkpointing.save(model_sd, str(tmp / layout.MODEL_DIR))
    fault("save_model", iteration)
    dist_checkpointing.save(optim_sd, str(tmp / layout.OPTIM_DIR))
    torch.save(_rng_state(), tmp / layout.RNG_DIR / f"rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        state = {**trainer_state, "iteration": iteration, "scheduler": actor.scheduler.state_dict(),
                 "world_size": dist.get_world_size(), "precision": actor.precision}
        (tmp / layout.TRAINER_STATE).write_text(json.dumps(state, indent=1, default=float))
        if hf_config_dir is not None and not (root / layout.HF_CONFIG_DIR).exists():
            _copy_hf_config(hf_config_dir, root / layout.HF_CONFIG_DIR)
        arch = layout.arch_summary(hf_config_dir) if hf_config_dir is not None else None
        fault("save_manifest", iteration)
        layout.write_manifest(tmp, layout.KIND_TRAIN, iteration, parent=layout.read_latest(root), arch=arch,
                              world_size=dist.get_world_size(),
                              vocab=layout.vocab_record(module.vocab_size, module.config.tensor_model_parallel_size))


def _copy_hf_config(src, dst: Path) -> None:
    from ..models.hf_io import copy_hf_metadata_files

    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    copy_hf_metadata_files(src, tmp)
    os.rename(tmp, dst)


def load_checkpoint(path, actor, manifest: Optional[dict] = None) -> dict:
    """Collective. Loads a verified checkpoint: the model (any TP/PP it was saved at) and, for kind "train", the
    optimizer, scheduler and RNG. Returns the trainer state ({} for a model-only checkpoint from the converter)."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    manifest = manifest or layout.read_manifest(path)
    module = actor.model.module
    module.load_state_dict(dist_checkpointing.load(module.sharded_state_dict(), str(path / layout.MODEL_DIR)),
                           strict=True)
    state = {}
    if manifest["kind"] == layout.KIND_TRAIN:
        state = json.loads((path / layout.TRAINER_STATE).read_text())
        _check_precision(path, state.get("precision"), actor.precision)
        _init_distributed_optimizer_state(actor.optimizer)
        optim_sd = actor.optimizer.sharded_state_dict(module.sharded_state_dict(), is_loading=True,
                                                      metadata=OPTIM_METADATA)
        actor.optimizer.load_state_dict(dist_checkpointing.load(optim_sd, str(path / layout.OPTIM_DIR)))
        _restore_distributed_optimizer_steps(actor.optimizer)
        actor.scheduler.load_state_dict(state["scheduler"])
        rng_file = path / layout.RNG_DIR / f"rank{dist.get_rank()}.pt"
        if state.get("world_size") == dist.get_world_size() and rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=False))
        elif dist.get_rank() == 0:
            print(f"note: {path.name} was saved by {state.get('world_size')} ranks, this run has "
                  f"{dist.get_world_size()}: RNG streams restart from trainer.seed", flush=True)
    elif hasattr(actor.optimizer, "reload_model_params"):
        # A model-only checkpoint: the fp32 main weights (bf16 runs) start from the loaded model. Never after an
        # optimizer load: this copies model -> main and would round the loaded fp32 main weights to bf16.
        actor.optimizer.reload_model_params()
    return state


def _check_precision(path: Path, saved: Optional[dict], mine: dict) -> None:
    """The optimizer state's layout follows actor.bf16 (fp32 main weights or none) and actor.use_distributed_optimizer
    (per-DP-rank shards or whole tensors): a resume must use the values it was saved with (not recorded before)."""
    diff = [k for k in sorted(mine) if saved is not None and bool(saved.get(k)) != bool(mine[k])]
    if diff:
        keys = ", ".join(f"actor.{k}={str(bool(saved.get(k))).lower()}" for k in diff)
        raise CheckpointError(f"{path} was saved with {keys}: set the same to resume it (its optimizer state's "
                              "layout depends on it)")


def _torch_adams_of_distributed_optimizers(optimizer):
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer) and isinstance(getattr(opt, "optimizer", None), torch.optim.Adam):
            yield opt.optimizer


def _init_distributed_optimizer_state(optimizer) -> None:
    """Adam state (zero moments) in a distributed optimizer that has not stepped yet, for the load to fill. Without
    Transformer Engine or Apex (CPU), megatron-core 0.16 / 0.19's DistributedOptimizer.state_dict() needs a step in
    every state and its init_state_fn adds none; the load then writes back this placeholder step, not the saved one
    (which it keeps in param_groups): _restore_distributed_optimizer_steps puts the saved one in place."""
    for inner in _torch_adams_of_distributed_optimizers(optimizer):
        if inner.state:
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                inner.state[p] = {"step": torch.zeros((), dtype=torch.float32), "exp_avg": torch.zeros_like(p),
                                  "exp_avg_sq": torch.zeros_like(p)}


def _restore_distributed_optimizer_steps(optimizer) -> None:
    for inner in _torch_adams_of_distributed_optimizers(optimizer):
        for group in inner.param_groups:
            if "step" in group:
                for p in group["params"]:
                    inner.state[p]["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)
