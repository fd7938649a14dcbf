"""Rollout backends, chosen by registered name (`rollout.backend`): embedded | http | sglang.

A backend owns its client, its default weight sync, memory release while the actor trains, and shutdown; it also
owns the trainer side's one `WeightVersion` (shared with its client and weight sync). It lives on global rank 0.

The engines themselves start per node, before it (`start_node_engines`, collective): each trainer node's local rank 0
starts what the plan puts on its node (`start_engines` of the backend class), engine-only nodes run `dapo-megatron
engines` (rollout/node_engines.py, the same `start_engines`), and every rank gets all nodes' URLs.
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


def make_backend(rollout_cfg, *, model_path, seed: int, run_dir, api_key=None, engines=None) -> "RolloutBackend":
    if rollout_cfg.backend not in BACKENDS:
        raise ValueError(f"rollout.backend={rollout_cfg.backend!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[rollout_cfg.backend](rollout_cfg, model_path=model_path, seed=seed, run_dir=run_dir,
                                         api_key=api_key, engines=engines)


class NodeEngines:
    """The engines this rank started (if it is an engine node's local rank 0) and every node's engine URLs.

    `host_ranks`: the global ranks that host engines (tensor weight sync streams to each of them); `engine`: this
    rank's in-process embedded engine; `servers`: this node's SGLang servers."""

    def __init__(self, host_ranks=(), urls=(), *, api_key=None, engine=None, servers=None):
        self.host_ranks, self.urls, self.api_key = list(host_ranks), list(urls), api_key
        self.engine, self.servers = engine, servers

    def weight_sink(self):
        """Where this host's share of a tensor weight sync lands: its own engine (the version comes with each sync)."""
        from .weight_sync import make_weight_sync

        return make_weight_sync("tensor", self.engine) if self.engine is not None else None

    def shutdown(self):
        if self.servers is not None:
            self.servers.shutdown()
            self.servers = None


def run_api_key(cfg) -> str:
    """rollout.api_key, else $DAPO_ROLLOUT_API_KEY, else a fresh key for this run (never logged or saved)."""
    import secrets

    return configured_api_key(cfg) or secrets.token_urlsafe(32)


def configured_api_key(cfg):
    from .server import API_KEY_ENV

    return cfg.rollout.api_key or os.environ.get(API_KEY_ENV) or None


def sync_dir(rollout, run_dir) -> Path:
    """The folder of disk weight sync: rollout.weight_sync_dir, else <run_dir>/weight_sync."""
    return Path(rollout.weight_sync_dir or Path(run_dir) / "weight_sync")


def start_node_engines(cfg) -> NodeEngines:
    """Collective, once at start-up: each trainer node's local rank 0 starts the engines the plan puts on its node,
    bound to its address (placement.engine_bind_host); engines on nodes with no trainer rank (`dapo-megatron
    engines` runs them) are found from the node host list (placement.node_hosts) and waited for. Every rank gets
    every URL in engine order. The run's API key is resolved here, once, on global rank 0 (`run_api_key`) and
    shared with the other nodes' engines; engine-only nodes need it configured, the same on both sides. One node
    with the embedded engine: nothing is started here (the backend builds its in-process engine); external engines:
    rollout.urls."""
    import socket

    import torch.distributed as dist

    from ..config import ConfigError
    from ..placement import PlacementError, engine_bind_host, launch_plan, local_world_size, node_engine_hosts, \
        node_hosts, ordered_urls, remote_engine_urls

    r, world, rank = cfg.rollout, dist.get_world_size(), dist.get_rank()
    local = local_world_size(world)
    if r.backend == "http":
        return NodeEngines(urls=r.urls, api_key=run_api_key(cfg) if rank == 0 else None)
    try:  # the same on every rank: all raise, none waits
        plan = launch_plan(cfg, world, local)
    except PlacementError as e:
        raise ConfigError(str(e)) from None
    hosts, remote_nodes = node_engine_hosts(plan), plan.engine_only_nodes()
    if r.backend == "embedded" and world <= local and not remote_nodes:
        if r.host:
            raise ConfigError(f"rollout.host={r.host}: the embedded engine of a one-node run lives in rank 0's "
                              f"process and binds nothing; unset rollout.host (it applies to SGLang servers and "
                              f"multi-node engines)")
        return NodeEngines(api_key=run_api_key(cfg) if rank == 0 else None)
    box = [(configured_api_key(cfg), run_api_key(cfg)) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    configured, key = box[0]
    if remote_nodes and not configured:
        raise ConfigError(f"the engines on node(s) {', '.join(map(str, remote_nodes))} (`dapo-megatron engines`) "
                          f"and this trainer must share the run's API key: set $DAPO_ROLLOUT_API_KEY (or "
                          f"rollout.api_key) to the same value for both (launch/slurm/dapo.sbatch makes one per job)")
    started, error, remote = None, None, []
    if rank in hosts:
        try:
            bind, url_host = engine_bind_host(r.host, world // local, os.environ.get("DAPO_ROLLOUT_HOST"),
                                              lambda: socket.gethostbyname(socket.gethostname()))
            started = BACKENDS[r.backend].start_engines(cfg, hosts[rank], bind, url_host, key)
        except PlacementError as e:
            error = ConfigError(f"node {rank // local}: {e}")
        except Exception as e:  # noqa: BLE001 - every rank must hear of it, or the others wait forever
            error = RuntimeError(f"node {rank // local} could not start its engines: {' '.join(str(e).split())}")
    if rank == 0 and error is None and remote_nodes:
        from .engine_health import wait_for_engines

        try:
            remote = remote_engine_urls(plan, *node_hosts())
            wait_for_engines(remote, key, r.engine_wait_s)
        except (PlacementError, ConfigError) as e:
            error = ConfigError(str(e))
    gathered = [None] * world
    dist.all_gather_object(gathered, (None if error is None else (type(error).__name__, str(error)),
                                      started.urls if started is not None else None, remote))
    failed = [e for e, _, _ in gathered if e]
    if failed:
        if started is not None:
            started.shutdown()
        kind, msg = failed[0]
        raise (ConfigError if kind == "ConfigError" else RuntimeError)(msg)
    urls = ordered_urls([u for _, u, _ in gathered], hosts, gathered[0][2])
    return NodeEngines(sorted(hosts), urls, api_key=key, engine=getattr(started, "engine", None), servers=started)


class RolloutBackend:
    name = ""
    default_weight_sync = "disk"
    weight_sync_classes: dict = {}  # rollout.weight_sync -> registered WeightSync name, where not the mode's own

    def __init__(self, r, *, model_path, seed: int, run_dir, api_key=None, engines=None):
        self.cfg, self.model_path, self.seed, self.run_dir, self.api_key = r, str(model_path), seed, Path(run_dir), api_key
        self.engines = engines if engines is not None else NodeEngines()
        self.weight_sync_class().check_backend(self)  # refuse an impossible mode before any engine starts
        self.version = WeightVersion()
        self.client_kw = dict(max_concurrency=r.max_concurrency, request_timeout_s=r.request_timeout_s,
                              weight_version=self.version,
                              return_routed_experts=getattr(r, "return_routed_experts", False))
        if api_key:
            self.client_kw["api_key"] = api_key
        self.client = self._start()

    def _start(self):
        raise NotImplementedError

    @classmethod
    def start_engines(cls, cfg, engines: list, bind: str, url_host: str, api_key):
        """On an engine node's local rank 0: start `engines` (placement.Engine) there; returns an object with
        `urls` (one per engine) and `shutdown()`."""
        raise NotImplementedError(f"rollout.backend={cls.name} starts no engines")

    @property
    def sync_dir(self) -> Path:
        """The only folder disk weight updates are written to (and, for the embedded server, read from):
        rollout.weight_sync_dir, else <run_dir>/weight_sync."""
        return sync_dir(self.cfg, self.run_dir)

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

        if self.engines.urls:  # one engine per node (this one's in this process): every engine over HTTP
            self.engine = self.engines.engine
            return RolloutClient(self.engines.urls, **self.client_kw)
        self.engine = Engine(self.model_path, max_batch_size=self.cfg.engine_max_batch_size, seed=self.seed,
                             deterministic=self.cfg.deterministic)
        kw = {k: v for k, v in self.client_kw.items() if k != "api_key"}  # in-process: no network, no key
        return RolloutClient(engine=self.engine, **kw)

    @classmethod
    def start_engines(cls, cfg, engines: list, bind: str, url_host: str, api_key):
        from .server import launch_embedded_server

        if len(engines) != 1:
            raise RuntimeError(f"the embedded backend runs one engine per node, the plan puts {len(engines)} here")
        # port: the plan's (engine-only nodes: the trainer builds the URL from it), 0 (a free one) on trainer nodes
        server = launch_embedded_server(cfg.model.path, engines[0].port, host=bind, mode="thread", api_key=api_key,
                                        weights_root=sync_dir(cfg.rollout, cfg.trainer.run_dir),
                                        max_batch_size=cfg.rollout.engine_max_batch_size,
                                        seed=cfg.trainer.seed + engines[0].index,
                                        deterministic=cfg.rollout.deterministic)
        server.urls = [f"http://{url_host}:{server.url.rsplit(':', 1)[1]}"]
        return server

    def shutdown(self):
        if not self.engines.urls:  # per-node engines stop with their NodeEngines
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

    def weight_sync_mode(self) -> str:
        """auto: CUDA IPC to one colocated TP-1 server (placement._sync_mode plans the same); disk otherwise, and on
        a machine without CUDA (CPU test servers), where there is no IPC handle to give."""
        import torch

        r = self.cfg
        if r.weight_sync == "auto" and r.colocate and r.sglang_num_servers == 1 and r.sglang_tp_size == 1:
            return "tensor" if torch.cuda.is_available() else "disk"
        return super().weight_sync_mode()

    def _start(self):
        from .sglang_launcher import servers_for

        servers, self._own = self.engines.servers, None  # this node's, started by start_node_engines
        if servers is None:  # every engine on nodes of its own: no local server, a router (if any) on this node
            servers = self._own = servers_for(self.model_path, self.cfg, num_servers=0, router=False,
                                              api_key=self.api_key)
        servers.remote_worker_urls = [u for u in self.engines.urls if u not in servers.local_urls]
        if self.cfg.sglang_router:
            servers.start_router()  # on this node, over every node's servers
        self.servers = servers
        kw = {k: v for k, v in self.client_kw.items() if k != "api_key"}
        return servers.client(api_key=self.api_key, **kw)

    @classmethod
    def start_engines(cls, cfg, engines: list, bind: str, url_host: str, api_key):
        from .sglang_launcher import servers_for

        # servers_for: the same command lines the sglang-parser test checks (tests/test_sglang_cpu.py); this node's
        # share, on the plan's GPUs and ports
        servers = servers_for(cfg.model.path, cfg.rollout, num_servers=len(engines), host=bind, url_host=url_host,
                              base_port=engines[0].port, base_gpu_id=engines[0].gpus[0], router=False,
                              seed=cfg.trainer.seed + engines[0].index, api_key=api_key)
        servers.urls = servers.local_urls
        return servers.start()

    @contextlib.contextmanager
    def memory_released(self):
        if self.cfg.colocate and self.servers.enable_memory_saver:  # CPU servers (tests) release nothing
            with self.servers.memory_released():
                yield
        else:
            yield

    def shutdown(self):
        if self._own is not None:  # the router this rank started in front of other nodes' servers
            self._own.shutdown()
        # the servers stop with their NodeEngines (every node's own)
