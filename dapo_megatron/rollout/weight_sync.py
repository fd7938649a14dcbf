"""Weight sync from the trainer to the rollout engines, in Hugging Face names and layouts.

The trainer hands over an iterable of `(hf_name, tensor)` with full (unsharded) tensors; the Megatron -> HF
conversion lives in `dapo_megatron.models`. Three modes, chosen by a string (`make_weight_sync(mode, ...)`):

- `disk`: write HF safetensors shards (temp folder + rename; config and tokenizer copied from the base model folder)
  and call `/update_weights_from_disk` on every server. The folder must be readable by the servers.
- `tensor`: with the embedded engine, copy into the in-process `Engine` (CPU demo / tests), no serialisation; with
  real SGLang (`cuda_ipc`), hand CUDA IPC handles of each bucket to SGLang's `/update_weights_from_tensor` (one server
  of TP 1 on the sending rank's GPU, as slime/verl do for colocated engines): only handles cross the process boundary.
- `distributed`: SGLang's `/init_weights_update_group` + `/update_weights_from_distributed`, broadcasting bucketed
  tensors from this process (rank 0 of a dedicated NCCL group), generation paused and the cache flushed around it.

The backend picks the class by registered name (`WEIGHT_SYNC_MODES`, `RolloutBackend.weight_sync_classes`) and
builds it with `for_backend`; `check_backend` refuses, before any engine starts, a mode that cannot work there.

Real SGLang (0.5.23 on) loads tensor and distributed updates only inside a weight-update session:
pause -> `/begin_weight_update` -> buckets -> `/end_weight_update` -> flush -> continue.

Each sync sets the backend's `WeightVersion` (the trainer side's one owner) and passes it to the engines, which
report it with every sample. The trainer streams each pipeline stage's tensors in buckets
(`dapo_megatron.train.weight_stream`): `tensor` and `disk` consume them on the rank that hosts the engine or writes the
folder; `distributed` broadcasts from every stage's source rank over that stage's own group.

The receiving side of the embedded engine (name/shape checks, in-place copy) is in `engine.py`.
"""
import base64
import concurrent.futures
import contextlib
import io
import logging
import os
import shutil
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Iterable, Optional

import torch

from ..models.hf_io import write_hf_checkpoint  # the one HF writer (shared with the conversion tools)
from ..train.faults import corrupt_buckets, hang_update
from ..types import WeightVersion
from .client import RolloutError, RolloutServerError, run_sync, update_session

log = logging.getLogger(__name__)


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


class WeightSyncRefused(RolloutError):
    """A weight-sync mode that cannot work with this placement; one line naming the key and the fix."""


class WeightSyncTimeout(RolloutError):
    """A step of a weight sync missed rollout.weight_sync_timeout_s; one line naming the engine and the stage."""


DEFAULT_TIMEOUT_S = 600.0  # rollout.weight_sync_timeout_s's default


def _timeout_line(what: str, timeout_s: float) -> str:
    return (f"weight sync: {what} gave no answer within rollout.weight_sync_timeout_s={timeout_s:g} s; the engine "
            f"is hung (see its log), or raise rollout.weight_sync_timeout_s if the sync is only slow")


class SyncDeadline:
    """rollout.weight_sync_timeout_s on a blocking step that no timeout argument reaches (an in-process copy, a
    collective broadcast): past it, the step's one line on stderr and exit 2, since this thread is stuck in that call
    and nothing else can end it (the launcher takes the other ranks down)."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s

    def _expire(self, what: str):
        sys.stdout.flush()
        print(f"dapo-megatron: {_timeout_line(what, self.timeout_s)}", file=sys.stderr, flush=True)
        os._exit(2)

    @contextlib.contextmanager
    def step(self, what: str):
        timer = threading.Timer(self.timeout_s, self._expire, args=(what,))
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()

    def each(self, buckets, what: str):
        """`buckets`, each one's production and use under its own deadline."""
        it, i = iter(buckets), 0
        while True:
            with self.step(f"{what}, bucket {i}"):
                try:
                    bucket = next(it)
                except StopIteration:
                    return
                yield bucket
            i += 1


def bounded(call, what: str, timeout_s: float):
    """An engine call (a coroutine with the timeout already in it): a missed deadline as WeightSyncTimeout."""
    from .client import RolloutTimeoutError, run_sync

    try:
        return run_sync(call)
    except RolloutTimeoutError as e:
        err = WeightSyncTimeout(_timeout_line(f"{what}: {str(e).split(' gave no answer')[0]}", timeout_s))
        err.url = getattr(e, "url", None)  # the hung engine, for a supervisor to restart
        raise err from None


# --------------------------------------------------------------------------- sync modes
WEIGHT_SYNC_MODES: dict = {}  # registered name -> WeightSync class (filled by @register_weight_sync)


def register_weight_sync(name: str):
    """Register a WeightSync class under `name`. Its `mode` is the rollout.weight_sync value it serves (a backend maps
    a mode to another registered name through `RolloutBackend.weight_sync_classes`, e.g. tensor -> cuda_ipc)."""
    def wrap(cls):
        WEIGHT_SYNC_MODES[name] = cls
        return cls
    return wrap


def weight_sync_modes() -> list:
    """The rollout.weight_sync values (besides auto), in registration order."""
    return list(dict.fromkeys(cls.mode for cls in WEIGHT_SYNC_MODES.values()))


class WeightSync:
    """Base: `sync_buckets(buckets, version)` pushes one weight version; `last_sync` holds seconds and bytes.

    `weight_version` is the backend's `WeightVersion` (the trainer side's one owner); a sync sets it once the
    engines hold the new weights. `sync(named_tensors)` is the same for a flat iterable of (name, tensor).
    """
    mode = ""
    needs = ""  # what the mode needs of a backend, for the one-line refusal of a backend that does not offer it
    # How the trainer streams to it (train/stages.py: WeightSyncer). Default: every pipeline stage's buckets to global
    # rank 0, which holds this sync. to_engine_hosts: to every rank that hosts an engine (per-node engines), each
    # feeding its own. from_stage_sources: each stage's source rank sends its own (`for_stage`); rank 0 runs the
    # engines' update session around them.
    to_engine_hosts = False
    from_stage_sources = False

    def __init__(self, weight_version=None, bucket_size_mb: float = 512):
        self.version = weight_version if isinstance(weight_version, WeightVersion) else WeightVersion(weight_version or 0)
        self.bucket_bytes = int(bucket_size_mb * 2 ** 20)
        self.last_sync: dict = {}
        self.timeout_s = DEFAULT_TIMEOUT_S  # each step's deadline (rollout.weight_sync_timeout_s: `bounded_by`)

    def bounded_by(self, r) -> "WeightSync":
        self.timeout_s = r.weight_sync_timeout_s
        return self

    @property
    def weight_version(self) -> int:
        return self.version.value

    def sync(self, named_tensors: Iterable) -> int:
        return self.sync_buckets(iter_buckets(named_tensors, self.bucket_bytes))

    def sync_buckets(self, buckets: Iterable[list], version: Optional[int] = None) -> int:
        started = time.perf_counter()
        version = self.version.value + 1 if version is None else int(version)
        nbytes = self._push(corrupt_buckets(buckets, version), version)  # DAPO_FAULT=corrupt_bucket@N, else as is
        self.version.set(version)
        self.last_sync = {"seconds": time.perf_counter() - started, "bytes": nbytes, "weight_version": version}
        log.info("weight sync (%s) v%d: %.2f GB in %.2f s", self.mode, version, nbytes / 1e9,
                 self.last_sync["seconds"])
        return version

    def _push(self, buckets: Iterable[list], version: int) -> int:
        raise NotImplementedError

    def close(self):
        pass

    @classmethod
    def check_backend(cls, backend) -> None:
        """Raise WeightSyncRefused if this mode cannot work with `backend` (called before its engines start)."""

    @classmethod
    def for_backend(cls, backend) -> "WeightSync | None":
        """The sync a rollout backend (rollout/backends.py) uses on global rank 0."""
        return cls(backend.client, weight_version=backend.version,
                   bucket_size_mb=backend.cfg.weight_sync_bucket_mb).bounded_by(backend.cfg)


def _count(buckets, counter: list):
    for bucket in buckets:
        counter[0] += sum(t.numel() * t.element_size() for _, t in bucket)
        yield from bucket


def synced_folder(out_dir, version: int) -> Path:
    """Where disk sync writes weight version `version`: `out_dir/weights_v{N:06d}` (the one naming, also read by a
    restarted engine's catch-up, rollout/backends.py)."""
    return Path(out_dir) / f"weights_v{int(version):06d}"


def newest_synced(out_dir):
    """(version, path) of the newest `weights_v{N}` folder disk sync wrote under `out_dir` (each is renamed into place
    once complete), or None before the first sync."""
    found = sorted(Path(out_dir).glob("weights_v[0-9]*"))
    return (int(found[-1].name[len("weights_v"):]), found[-1]) if found else None


@register_weight_sync("disk")
class DiskWeightSync(WeightSync):
    """Write HF safetensors under `out_dir/weights_v{N}` and have every server load them.

    For engines that share a filesystem with the writing rank (the only mode that needs one)."""
    mode = "disk"
    needs = "a filesystem shared by the writing rank and the engines"

    def __init__(self, client, base_model_path, out_dir, *, max_shard_size_mb: float = 2048, keep_last: int = 1,
                 weight_version=None, bucket_size_mb: float = 512):
        super().__init__(weight_version, bucket_size_mb)
        self.client, self.base_model_path, self.out_dir = client, Path(base_model_path), Path(out_dir)
        self.max_shard_bytes, self.keep_last = int(max_shard_size_mb * 2 ** 20), max(1, keep_last)

    @classmethod
    def for_backend(cls, backend):
        return cls(backend.client, backend.model_path, backend.sync_dir, weight_version=backend.version,
                   bucket_size_mb=backend.cfg.weight_sync_bucket_mb).bounded_by(backend.cfg)

    def _push(self, buckets, version: int) -> int:
        nbytes = [0]
        path = write_hf_checkpoint(_count(buckets, nbytes), synced_folder(self.out_dir, version),
                                   hf_config_dir=self.base_model_path, max_shard_bytes=self.max_shard_bytes,
                                   overwrite=True)
        def update():
            bounded(self.client.update_weights_from_disk(str(path), weight_version=version, timeout_s=self.timeout_s),
                    f"update_weights_from_disk to version {version}", self.timeout_s)

        supervisor = getattr(self.client, "supervisor", None)  # supervised engines (rollout/supervisor.py)
        if supervisor is not None:
            supervisor.settle(self.timeout_s)  # an engine being restarted gets this update, not an old catch-up
        try:
            update()
        except WeightSyncTimeout as e:  # supervised: restart the hung engine, sync again
            if supervisor is None or getattr(e, "url", None) is None:
                raise
            log.warning("%s: restarting that engine and syncing again", e)
            supervisor.report_hung(e.url, "hung in a weight update past rollout.weight_sync_timeout_s")
            update()
        except RolloutServerError:  # an engine died meanwhile
            unowned = getattr(self.client, "catch_up", None) is not None  # engines we do not restart, or not all
            if supervisor is None and not unowned:
                raise
            if supervisor is not None:  # ours: restarted and caught up, then the update again
                supervisor.settle(self.timeout_s)
            if not unowned:
                update()
            else:  # someone else's, or another node's: skipped while down, caught up when back (it answers with its
                self.client.wait_external()  # own weights until then); all down: wait
                run_sync(self.client.update_weights_from_disk(str(path), weight_version=version,
                                                              timeout_s=self.timeout_s, strict=False))
        for old in sorted(self.out_dir.glob("weights_v*"))[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return nbytes[0]


@register_weight_sync("tensor")
class TensorWeightSync(WeightSync):
    """Copy into an in-process embedded engine, bucket by bucket. Takes the Engine or a RolloutClient(engine=)."""
    mode = "tensor"
    to_engine_hosts = True
    needs = ("the engine in the trainer's process (embedded) or one colocated SGLang server of TP 1 on its GPU "
             "(colocate=true, sglang_num_servers=1, sglang_tp_size=1)")

    def __init__(self, engine, *, weight_version=None, bucket_size_mb: float = 512):
        super().__init__(weight_version, bucket_size_mb)
        self.engine = getattr(engine, "engine", None) or engine
        if not hasattr(self.engine, "update_weights_from_buckets"):
            raise ValueError("tensor weight sync needs the in-process Engine (or RolloutClient(engine=...)); "
                             "for HTTP servers use mode 'disk' or 'distributed'")

    @classmethod
    def check_backend(cls, backend):
        if "tensor" not in backend.weight_sync_modes:  # a backend that declares it hands over its in-process engine
            raise WeightSyncRefused(f"rollout.weight_sync=tensor with rollout.backend={backend.name} needs the engine "
                                    f"in the trainer's process or SGLang servers this rank starts; use disk or "
                                    f"distributed")

    @classmethod
    def for_backend(cls, backend):
        # rank 0's own engine; with one engine per node, the other hosts' share lands in their own (NodeEngines)
        return cls(getattr(backend, "engine", None) or backend.client, weight_version=backend.version,
                   bucket_size_mb=backend.cfg.weight_sync_bucket_mb).bounded_by(backend.cfg)

    def _push(self, buckets, version: int) -> int:
        nbytes = [0]

        def counted():
            hang_update(version)  # DAPO_FAULT=engine_hang_update@N: the in-process update does not go via dispatch
            for bucket in buckets:
                nbytes[0] += sum(t.numel() * t.element_size() for _, t in bucket)
                yield bucket

        # The engine holds generation for the whole stream: a partial update never serves requests. An in-process
        # copy takes no timeout: each bucket runs under a watchdog.
        self.engine.update_weights_from_buckets(
            SyncDeadline(self.timeout_s).each(counted(), f"the in-process engine's update to version {version}"),
            weight_version=version)
        return nbytes[0]


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


@register_weight_sync("distributed")
class DistributedWeightSync(WeightSync):
    """Broadcast from this process (rank 0) to every SGLang worker over a dedicated NCCL group.

    `engine_ranks`: GPU ranks per worker (its tp_size), in the order of `client.worker_urls`. With pipeline
    parallelism every stage's source rank owns one of these, with its own `group_name` and `master_port`, and
    sends only its stage; `manage_generation=False` then leaves the session (pause, begin, end, flush, continue) to
    the caller (rank 0).
    """
    mode = "distributed"
    needs = "SGLang engines that join an NCCL group"
    from_stage_sources = True

    @classmethod
    def for_backend(cls, backend):
        return None  # every pipeline stage's source rank sends its own tensors (for_stage)

    @classmethod
    def for_stage(cls, r, urls: list, api_key, pp_rank: int, version) -> "DistributedWeightSync":
        """The sender of pipeline stage `pp_rank`'s source rank (train/stages.py: WeightSyncer), to the engine
        workers at `urls`; rank 0 runs the session around it (manage_generation=False)."""
        import os
        import socket

        from .client import RolloutClient

        client = RolloutClient(urls, api_key=api_key)
        # This rank is rank 0 of its stage's group and hosts the group's rendezvous: an address of this host that
        # the engines reach (DAPO_WEIGHT_SYNC_ADDR overrides, e.g. a fabric interface).
        here = os.environ.get("DAPO_WEIGHT_SYNC_ADDR") or socket.gethostbyname(socket.gethostname())
        return cls(client, master_address=here, master_port=int(os.environ.get("DAPO_WEIGHT_SYNC_PORT", "29600")) +
                   pp_rank, engine_ranks=r.sglang_tp_size, group_name=f"dapo_weight_sync_pp{pp_rank}",
                   bucket_size_mb=r.weight_sync_bucket_mb, weight_version=version,
                   manage_generation=False).bounded_by(r)

    def __init__(self, client, *, master_address: str, master_port: int, engine_ranks=1,
                 bucket_size_mb: float = 512, group_name: str = "dapo_weight_sync", backend: str = "nccl",
                 device: str = "cuda", weight_version=None, manage_generation: bool = True):
        super().__init__(weight_version, bucket_size_mb)
        self.manage_generation = manage_generation
        self.client, self.group_name, self.backend, self.device = client, group_name, backend, device
        self.master_address, self.master_port = master_address, master_port
        urls = client.worker_urls
        self.engine_ranks = [engine_ranks] * len(urls) if isinstance(engine_ranks, int) else list(engine_ranks)
        if len(self.engine_ranks) != len(urls):
            raise ValueError(f"engine_ranks has {len(self.engine_ranks)} entries for {len(urls)} worker urls")
        self.group = None
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="weight-sync-http")

    def init_group(self):
        world_size = 1 + sum(self.engine_ranks)
        offsets = [1 + sum(self.engine_ranks[:i]) for i in range(len(self.engine_ranks))]
        payloads = [{"master_address": self.master_address, "master_port": self.master_port, "rank_offset": off,
                     "world_size": world_size, "group_name": self.group_name, "backend": self.backend}
                    for off in offsets]
        # The workers block in the rendezvous until this process joins it: call them from a thread.
        pending = self._pool.submit(bounded, self.client.init_weights_update_group(payloads, self.timeout_s),
                                    "init_weights_update_group", self.timeout_s)
        # the group's own timeout bounds its rendezvous and (gloo) collectives; a watchdog, the NCCL broadcasts
        self.group = init_weight_update_group(self.master_address, self.master_port, 0, world_size,
                                              self.group_name, self.backend, timeout_s=self.timeout_s)
        pending.result()

    def _push(self, buckets, version: int) -> int:
        if self.group is None:
            self.init_group()
        if not self.manage_generation:
            return sum(self._send_bucket(bucket, version) for bucket in buckets)
        with update_session(self.client):
            return sum(self._send_bucket(bucket, version) for bucket in buckets)

    def _send_bucket(self, bucket: list, version: int) -> int:
        tensors = [t.detach().to(self.device).contiguous() for _, t in bucket]
        meta = {"names": [n for n, _ in bucket], "dtypes": [str(t.dtype).replace("torch.", "") for t in tensors],
                "shapes": [list(t.shape) for t in tensors], "group_name": self.group_name, "flush_cache": False,
                "weight_version": str(version)}
        pending = self._pool.submit(bounded, self.client.update_weights_from_distributed(meta, self.timeout_s),
                                    f"update_weights_from_distributed to version {version}", self.timeout_s)
        with SyncDeadline(self.timeout_s).step(f"the broadcast of {len(tensors)} tensors to version {version} over "
                                               f"{self.group_name}"):
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


# --------------------------------------------------------------------------- tensor mode for real SGLang: CUDA IPC
def serialize_named_tensors(named_tensors: list) -> str:
    """`[(name, tensor), ...]` as SGLang's MultiprocessingSerializer writes it (a ForkingPickler dump: CUDA tensors
    become IPC handles, not data), base64-encoded because JSON has no bytes (sglang decodes it on the HTTP side)."""
    from multiprocessing.reduction import ForkingPickler

    buf = io.BytesIO()
    ForkingPickler(buf).dump(named_tensors)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def pack_bucket(bucket: list, device) -> tuple[list, int]:
    """Copy one bucket into a fresh flat buffer per dtype on `device`; returns (name, view) pairs in bucket order
    (one IPC handle per buffer, however many tensors) and the bytes. Fresh buffers, never reused: SGLang may answer
    before its copy out of them ran, and torch keeps a shared block alive until the receiver drops it."""
    sizes: dict = {}
    for _, t in bucket:
        sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel()
    flats = {dt: torch.empty(n, dtype=dt, device=device) for dt, n in sizes.items()}
    offsets, named = dict.fromkeys(flats, 0), []
    for name, t in bucket:
        o, n = offsets[t.dtype], t.numel()
        view = flats[t.dtype][o:o + n]
        view.copy_(t.detach().reshape(-1))
        named.append((name, view.view(t.shape)))
        offsets[t.dtype] = o + n
    return named, sum(f.numel() * f.element_size() for f in flats.values())


def tensor_update_request(named_tensors: list, version: int) -> dict:
    """The body of SGLang's `/update_weights_from_tensor` (UpdateWeightsFromTensorReqInput) for an engine of TP 1:
    one serialized list per engine TP rank; load_format None = the model's own HF-name `load_weights`; the cache is
    flushed once after the last bucket (update_session)."""
    return {"serialized_named_tensors": [serialize_named_tensors(named_tensors)], "load_format": None,
            "flush_cache": False, "weight_version": str(version)}


def check_ipc_sender(engine_gpu: int) -> None:
    """CUDA IPC needs CUDA here and the engine on this rank's GPU; else one line naming the key and the fix."""
    key = "rollout.weight_sync=tensor with rollout.backend=sglang"
    if not torch.cuda.is_available():
        raise WeightSyncRefused(f"{key} sends CUDA IPC handles, but this rank has no CUDA device; use "
                                f"rollout.weight_sync=disk")
    here = torch.cuda.current_device()
    if here != engine_gpu:
        raise WeightSyncRefused(f"{key} needs the engine on the sending rank's GPU, but global rank 0 is on GPU {here} "
                                f"and the engine on GPU {engine_gpu}; use rollout.weight_sync=disk or distributed")


@register_weight_sync("cuda_ipc")
class CudaIpcWeightSync(WeightSync):
    """Tensor mode with a real SGLang server colocated on this rank's GPU: every bucket is packed into fresh flat
    buffers and sent as CUDA IPC handles to `/update_weights_from_tensor`, inside one weight-update session.

    `device`: the sending rank's GPU, which must be the engine's (check_ipc_sender); "cpu" only for protocol tests
    (CPU tensors do not cross unrelated processes this way)."""
    mode = "tensor"
    needs, to_engine_hosts = TensorWeightSync.needs, TensorWeightSync.to_engine_hosts

    def __init__(self, client, *, device="cuda", weight_version=None, bucket_size_mb: float = 512):
        super().__init__(weight_version, bucket_size_mb)
        if len(client.worker_urls) != 1:
            raise WeightSyncRefused(f"tensor weight sync over CUDA IPC sends to one colocated server; got "
                                    f"{len(client.worker_urls)}: set rollout.sglang_num_servers=1 or use disk")
        self.client, self.device = client, torch.device(device)

    @classmethod
    def check_backend(cls, backend):
        r = backend.cfg
        if not r.colocate or r.sglang_num_servers != 1 or r.sglang_tp_size != 1:
            raise WeightSyncRefused("rollout.weight_sync=tensor with rollout.backend=sglang needs one colocated "
                                    "server of TP 1 on the sending rank's GPU (rollout.colocate=true, "
                                    "sglang_num_servers=1, sglang_tp_size=1); use disk or distributed")
        check_ipc_sender(engine_gpu=0)  # servers_for starts server 0 on GPU base_gpu_id = 0, this node

    @classmethod
    def for_backend(cls, backend):
        check_ipc_sender(engine_gpu=backend.servers.base_gpu_id)
        return cls(backend.client, device=f"cuda:{backend.servers.base_gpu_id}", weight_version=backend.version,
                   bucket_size_mb=backend.cfg.weight_sync_bucket_mb).bounded_by(backend.cfg)

    def _push(self, buckets, version: int) -> int:
        nbytes = 0
        with update_session(self.client):
            for bucket in buckets:
                named, size = pack_bucket(bucket, self.device)
                bounded(self.client.update_weights_from_tensor(tensor_update_request(named, version), self.timeout_s),
                        f"update_weights_from_tensor to version {version}", self.timeout_s)
                nbytes += size
                del named  # this side's reference; torch's IPC limbo holds the block until the engine drops its own
        if self.device.type == "cuda":
            torch.cuda.ipc_collect()
        return nbytes


def make_weight_sync(mode: str, *args, **kwargs) -> WeightSync:
    """`make_weight_sync("disk", client, base_model_path, out_dir)`, `("tensor", engine)`,
    `("distributed", client, master_address=..., master_port=...)`, `("cuda_ipc", client)` (real SGLang, same GPU)."""
    if mode not in WEIGHT_SYNC_MODES:
        raise ValueError(f"unknown weight sync mode {mode!r}; choose one of {sorted(WEIGHT_SYNC_MODES)}")
    return WEIGHT_SYNC_MODES[mode](*args, **kwargs)
