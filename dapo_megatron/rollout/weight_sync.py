"""Weight sync from the trainer to the rollout engines, in Hugging Face names and layouts.

The trainer hands over an iterable of `(hf_name, tensor)` with full (unsharded) tensors; the Megatron -> HF
conversion lives in `dapo_megatron.models`. Three modes, chosen by a string (`make_weight_sync(mode, ...)`):

- `disk`: write HF safetensors shards (temp folder + rename; config and tokenizer copied from the base model folder)
  and call `/update_weights_from_disk` on every server. The folder must be readable by the servers.
- `tensor`: copy into an in-process embedded `Engine` (CPU demo / tests), no serialisation.
- `distributed`: SGLang's `/init_weights_update_group` + `/update_weights_from_distributed`, broadcasting bucketed
  tensors from this process (rank 0 of a dedicated NCCL group), generation paused and the cache flushed around it.

Each `sync()` increases `weight_version` by one and passes it to the engines, which report it with every sample.
Call `sync()` from one trainer process (the one holding the gathered HF tensors).

The receiving side of the embedded engine (name/shape checks, safetensors reading, in-place copy) is here too.
"""
import concurrent.futures
import json
import logging
import shutil
import time
from datetime import timedelta
from pathlib import Path
from typing import Iterable

import torch

from ..models.hf_io import write_hf_checkpoint  # the one HF writer (shared with the conversion tools)

log = logging.getLogger(__name__)

_ARCH_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
              "intermediate_size")


# --------------------------------------------------------------------------- HF checkpoint I/O
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


def iter_buckets(named_tensors: Iterable, bucket_bytes: int):
    """Group `(name, tensor)` pairs into lists of about `bucket_bytes` (a larger tensor gets a bucket alone)."""
    bucket, size = [], 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


# --------------------------------------------------------------------------- sync modes
class WeightSync:
    """Base: `sync(named_tensors) -> new weight_version`; `last_sync` holds seconds and bytes of the last call."""
    mode = ""

    def __init__(self, weight_version: int = 0):
        self.weight_version = weight_version
        self.last_sync: dict = {}

    def sync(self, named_tensors: Iterable) -> int:
        raise NotImplementedError

    def close(self):
        pass

    def _done(self, version: int, started: float, nbytes: int) -> int:
        self.weight_version = version
        self.last_sync = {"seconds": time.perf_counter() - started, "bytes": nbytes, "weight_version": version}
        log.info("weight sync (%s) v%d: %.2f GB in %.2f s", self.mode, version, nbytes / 1e9,
                 self.last_sync["seconds"])
        return version


class _ByteCounter:
    def __init__(self, named_tensors):
        self.named, self.nbytes = named_tensors, 0

    def __iter__(self):
        for name, tensor in self.named:
            self.nbytes += tensor.numel() * tensor.element_size()
            yield name, tensor


class DiskWeightSync(WeightSync):
    """Write HF safetensors under `out_dir/weights_v{N}` and have every server load them."""
    mode = "disk"

    def __init__(self, client, base_model_path, out_dir, *, max_shard_size_mb: float = 2048, keep_last: int = 1,
                 weight_version: int = 0):
        super().__init__(weight_version)
        self.client, self.base_model_path, self.out_dir = client, Path(base_model_path), Path(out_dir)
        self.max_shard_bytes, self.keep_last = int(max_shard_size_mb * 2 ** 20), max(1, keep_last)

    def sync(self, named_tensors: Iterable) -> int:
        from .client import run_sync

        started, version = time.perf_counter(), self.weight_version + 1
        counter = _ByteCounter(named_tensors)
        path = write_hf_checkpoint(counter, self.out_dir / f"weights_v{version:06d}", hf_config_dir=self.base_model_path,
                                   max_shard_bytes=self.max_shard_bytes, overwrite=True)
        run_sync(self.client.update_weights_from_disk(str(path), weight_version=version))
        for old in sorted(self.out_dir.glob("weights_v*"))[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return self._done(version, started, counter.nbytes)


class TensorWeightSync(WeightSync):
    """Copy into an in-process embedded engine. Takes the Engine or a RolloutClient built with `engine=`."""
    mode = "tensor"

    def __init__(self, engine, *, weight_version: int = 0):
        super().__init__(weight_version)
        self.engine = getattr(engine, "engine", None) or engine
        if not hasattr(self.engine, "update_weights_from_tensor"):
            raise ValueError("tensor weight sync needs the in-process Engine (or RolloutClient(engine=...)); "
                             "for HTTP servers use mode 'disk' or 'distributed'")

    def sync(self, named_tensors: Iterable) -> int:
        # One call with every tensor: a partial update must never serve requests (this holds references, not copies).
        started, version = time.perf_counter(), self.weight_version + 1
        named = list(named_tensors)
        self.engine.update_weights_from_tensor(named, weight_version=version)
        return self._done(version, started, sum(t.numel() * t.element_size() for _, t in named))


def init_weight_update_group(master_address: str, master_port: int, rank: int, world_size: int, group_name: str,
                             backend: str = "nccl", timeout_s: float = 600.0):
    """Create a process group outside the default one, the way SGLang's receiver does (TCP rendezvous at
    `master_address:master_port`, store prefixed by `group_name`), so both sides form the same group."""
    from torch.distributed import distributed_c10d as c10d
    import inspect

    timeout = timedelta(seconds=timeout_s)
    store, rank, world_size = next(c10d.rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size,
                                                   timeout=timeout))
    store.set_timeout(timeout)
    store = c10d.PrefixStore(group_name, store)
    options = "backend_options" if "backend_options" in inspect.signature(c10d._new_process_group_helper).parameters \
        else "pg_options"
    group, _ = c10d._new_process_group_helper(world_size, rank, [], c10d.Backend(backend), store,
                                              group_name=group_name, timeout=timeout, **{options: None})
    c10d._world.pg_group_ranks[group] = {i: i for i in range(world_size)}  # lets dist.broadcast(group=...) work
    return group


class DistributedWeightSync(WeightSync):
    """Broadcast from this process (rank 0) to every SGLang worker over a dedicated NCCL group.

    `engine_ranks`: GPU ranks per worker (its tp_size), in the order of `client.worker_urls`.
    """
    mode = "distributed"

    def __init__(self, client, *, master_address: str, master_port: int, engine_ranks=1,
                 bucket_size_mb: float = 512, group_name: str = "dapo_weight_sync", backend: str = "nccl",
                 device: str = "cuda", weight_version: int = 0):
        super().__init__(weight_version)
        self.client, self.group_name, self.backend, self.device = client, group_name, backend, device
        self.master_address, self.master_port = master_address, master_port
        urls = client.worker_urls
        self.engine_ranks = [engine_ranks] * len(urls) if isinstance(engine_ranks, int) else list(engine_ranks)
        if len(self.engine_ranks) != len(urls):
            raise ValueError(f"engine_ranks has {len(self.engine_ranks)} entries for {len(urls)} worker urls")
        self.bucket_bytes = int(bucket_size_mb * 2 ** 20)
        self.group = None
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="weight-sync-http")

    def init_group(self):
        from .client import run_sync

        world_size = 1 + sum(self.engine_ranks)
        offsets = [1 + sum(self.engine_ranks[:i]) for i in range(len(self.engine_ranks))]
        payloads = [{"master_address": self.master_address, "master_port": self.master_port, "rank_offset": off,
                     "world_size": world_size, "group_name": self.group_name, "backend": self.backend}
                    for off in offsets]
        # The workers block in the rendezvous until this process joins it: call them from a thread.
        pending = self._pool.submit(run_sync, self.client.init_weights_update_group(payloads))
        self.group = init_weight_update_group(self.master_address, self.master_port, 0, world_size,
                                              self.group_name, self.backend)
        pending.result()

    def sync(self, named_tensors: Iterable) -> int:
        from .client import run_sync

        if self.group is None:
            self.init_group()
        started, version, nbytes = time.perf_counter(), self.weight_version + 1, 0
        run_sync(self.client.pause_generation())
        try:
            for bucket in iter_buckets(named_tensors, self.bucket_bytes):
                nbytes += self._send_bucket(bucket, version)
            run_sync(self.client.flush_cache())
        finally:
            run_sync(self.client.continue_generation())
        return self._done(version, started, nbytes)

    def _send_bucket(self, bucket: list, version: int) -> int:
        from .client import run_sync

        tensors = [t.detach().to(self.device).contiguous() for _, t in bucket]
        meta = {"names": [n for n, _ in bucket], "dtypes": [str(t.dtype).replace("torch.", "") for t in tensors],
                "shapes": [list(t.shape) for t in tensors], "group_name": self.group_name, "flush_cache": False,
                "weight_version": str(version)}
        pending = self._pool.submit(run_sync, self.client.update_weights_from_distributed(meta))
        handles = [torch.distributed.broadcast(t, src=0, group=self.group, async_op=True) for t in tensors]
        for h in handles:
            h.wait()
        pending.result()
        return sum(t.numel() * t.element_size() for t in tensors)

    def close(self):
        from .client import run_sync

        if self.group is not None:
            run_sync(self.client.destroy_weights_update_group(self.group_name))
            torch.distributed.destroy_process_group(self.group)
            self.group = None
        self._pool.shutdown(wait=False)


WEIGHT_SYNC_MODES = {"disk": DiskWeightSync, "tensor": TensorWeightSync, "distributed": DistributedWeightSync}


def make_weight_sync(mode: str, *args, **kwargs) -> WeightSync:
    """`make_weight_sync("disk", client, base_model_path, out_dir)`, `("tensor", engine)`,
    `("distributed", client, master_address=..., master_port=...)`."""
    if mode not in WEIGHT_SYNC_MODES:
        raise ValueError(f"unknown weight sync mode {mode!r}; choose one of {sorted(WEIGHT_SYNC_MODES)}")
    return WEIGHT_SYNC_MODES[mode](*args, **kwargs)
