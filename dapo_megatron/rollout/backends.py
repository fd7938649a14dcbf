"""Rollout backends, chosen by registered name (`rollout.backend`): embedded | http | sglang.

A backend owns its client, its default weight sync, memory release while the actor trains, and shutdown; it also
owns the trainer side's one `WeightVersion` (shared with its client and weight sync). It lives on global rank 0.
"""
import contextlib
import os
from pathlib import Path

from ..types import WeightVersion

BACKENDS: dict = {}


def register(name: str):
    def wrap(cls):
        cls.name = name
        BACKENDS[name] = cls
        return cls
    return wrap


def make_backend(rollout_cfg, *, model_path, seed: int, run_dir, api_key=None) -> "RolloutBackend":
    if rollout_cfg.backend not in BACKENDS:
        raise ValueError(f"rollout.backend={rollout_cfg.backend!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[rollout_cfg.backend](rollout_cfg, model_path=model_path, seed=seed, run_dir=run_dir,
                                         api_key=api_key)


class RolloutBackend:
    name = ""
    default_weight_sync = "disk"
    weight_sync_classes: dict = {}  # rollout.weight_sync -> registered WeightSync name, where not the mode's own

    def __init__(self, r, *, model_path, seed: int, run_dir, api_key=None):
        self.cfg, self.model_path, self.seed, self.run_dir, self.api_key = r, str(model_path), seed, Path(run_dir), api_key
        self.weight_sync_class().check_backend(self)  # refuse an impossible mode before any engine starts
        self.version = WeightVersion()
        self.client_kw = dict(max_concurrency=r.max_concurrency, request_timeout_s=r.request_timeout_s,
                              weight_version=self.version)
        if api_key:
            self.client_kw["api_key"] = api_key
        self.client = self._start()

    def _start(self):
        raise NotImplementedError

    @property
    def sync_dir(self) -> Path:
        """The only folder disk weight updates are written to (and, for the embedded server, read from)."""
        return self.run_dir / "weight_sync"

    def weight_sync_mode(self) -> str:
        mode = self.cfg.weight_sync
        return self.default_weight_sync if mode == "auto" else mode

    def weight_sync_class(self):
        """The registered WeightSync (rollout/weight_sync.py) of rollout.weight_sync for this backend."""
        from .weight_sync import WEIGHT_SYNC_MODES

        mode = self.weight_sync_mode()
        return WEIGHT_SYNC_MODES[self.weight_sync_classes.get(mode, mode)]

    def make_weight_sync(self):
        """Rank 0's sync; None in distributed mode, where rank 0 only runs the session (pause ... continue) and each
        pipeline stage's source rank broadcasts its own tensors over its own group (train/stages.py)."""
        return self.weight_sync_class().for_backend(self)

    @contextlib.contextmanager
    def memory_released(self):
        yield

    def shutdown(self):
        pass


@register("embedded")
class EmbeddedBackend(RolloutBackend):
    """The CPU engine in this process (tests, demo); weights arrive as tensors, bucket by bucket."""
    default_weight_sync = "tensor"

    def _start(self):
        from .client import RolloutClient
        from .engine import Engine

        self.engine = Engine(self.model_path, max_batch_size=self.cfg.engine_max_batch_size, seed=self.seed,
                             deterministic=self.cfg.deterministic)
        kw = {k: v for k, v in self.client_kw.items() if k != "api_key"}  # in-process: no network, no key
        return RolloutClient(engine=self.engine, **kw)

    def shutdown(self):
        self.engine.shutdown()


@register("http")
class HttpBackend(RolloutBackend):
    """Servers (or a router) someone else runs: `rollout.urls`."""

    def _start(self):
        from .client import RolloutClient

        return RolloutClient(list(self.cfg.urls), **self.client_kw)


@register("sglang")
class SGLangBackend(RolloutBackend):
    """Real SGLang servers started by this rank on this node's GPUs (GPU only). Tensor weight sync hands CUDA IPC
    handles to the colocated server (weight_sync.CudaIpcWeightSync)."""
    weight_sync_classes = {"tensor": "cuda_ipc"}

    def _start(self):
        from .sglang_launcher import servers_for

        r = self.cfg
        world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
        if not r.colocate or (local and world > local):
            # Not built yet: starting engines from each node's local rank 0 (the plan shows where they belong).
            raise RuntimeError("rollout.backend=sglang starts its servers on global rank 0's node only; for engines "
                               "on other nodes (multi-node or colocate=false) start them there and use "
                               "rollout.backend=http with rollout.urls")
        host = os.environ.get("DAPO_ROLLOUT_HOST", "127.0.0.1")
        # servers_for: the same command lines the sglang-parser test checks (tests/test_sglang_cpu.py)
        self.servers = servers_for(self.model_path, r, host=host, api_key=self.api_key).start()
        kw = {k: v for k, v in self.client_kw.items() if k != "api_key"}
        return self.servers.client(api_key=self.api_key, **kw)

    @contextlib.contextmanager
    def memory_released(self):
        if self.cfg.colocate:
            with self.servers.memory_released():
                yield
        else:
            yield

    def shutdown(self):
        self.servers.shutdown()
