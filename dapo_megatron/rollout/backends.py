"""Rollout backends, chosen by registered name (`rollout.backend`): embedded | http | sglang, or any `@register`ed.

A backend owns its client (rollout/protocol.py: `RolloutFleet`), memory release while the actor trains, and shutdown;
it also owns the trainer side's one `WeightVersion` (shared with its client and weight sync). It lives on global rank
0. Its class declares, once, what validation (config.py), `dapo-megatron plan` (placement.py) and the start-up read:
the weight-sync modes it takes and its default, whether its engines are someone else's (`external`) or live in rank
0's process on one node, whether colocated engines release their memory while the actor trains, its engine sizing
(`plan_engines`) and its description in the plan (`describe_engines`).

The engines themselves start per node, before it (rollout/node_engines.py: `start_node_engines`, collective): each
trainer node's local rank 0 starts what the plan puts on its node (`start_engines` of the backend class), engine-only
nodes run `dapo-megatron engines` (the same `start_engines`), and every rank gets all nodes' URLs.
"""
import contextlib
import os
from pathlib import Path

from ..types import WeightVersion

BACKENDS: dict = {}


def register(name: str):
    """Register a RolloutBackend subclass as `rollout.backend=<name>` (validation and the plan read it from here)."""
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

    return configured_api_key(cfg) or secrets.token_hex(32)  # hex: never starts with '-', which a CLI would read as a flag


def configured_api_key(cfg):
    from .server import API_KEY_ENV

    return cfg.rollout.api_key or os.environ.get(API_KEY_ENV) or None


def sync_dir(rollout, run_dir) -> Path:
    """The folder of disk weight sync: rollout.weight_sync_dir, else <run_dir>/weight_sync."""
    return Path(rollout.weight_sync_dir or Path(run_dir) / "weight_sync")


def disk_catch_up(folder, api_key, timeout_s: float):
    """A restarted engine's catch-up on any node (disk sync, a shared folder): load the newest synced folder at its
    version (the trainer's, or the one being synced: the update then comes again); none yet: model.path's weights."""
    def catch_up(url):
        from .client import RolloutClient, run_sync
        from .weight_sync import newest_synced

        found = newest_synced(folder)
        if found is not None:
            run_sync(RolloutClient([url], api_key=api_key).update_weights_from_disk(
                str(found[1]), weight_version=found[0], timeout_s=timeout_s))
    return catch_up


def backend_names() -> str:
    """"a, b or c": the registered backends, for messages."""
    names = sorted(BACKENDS)
    return " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def refuse_weight_sync(r, allowed) -> str:
    """The one-line refusal of rollout.weight_sync=<mode> by a backend that takes only `allowed`."""
    from .weight_sync import WEIGHT_SYNC_MODES

    needs = next((c.needs for c in WEIGHT_SYNC_MODES.values() if c.mode == r.weight_sync and c.needs),
                 "another backend")
    return f"rollout.weight_sync={r.weight_sync} with rollout.backend={r.backend} needs {needs}; use " + \
        " or ".join(allowed)


class RolloutBackend:
    name = ""
    default_weight_sync = "disk"  # rollout.weight_sync=auto
    weight_sync_modes: tuple = ("disk", "distributed")  # the rollout.weight_sync values it takes (besides auto)
    weight_sync_classes: dict = {}  # rollout.weight_sync -> registered WeightSync name, where not the mode's own
    external = False  # engines someone else runs (rollout.urls): nothing is placed or started
    in_process_on_one_node = False  # one node: the engine lives in rank 0's process (built by the backend)
    releases_memory_when_colocated = False  # colocated engines free their GPU memory while the actor trains
    serves_weights_digest = False  # its engines answer /debug/weights_digest: rollout.check_weight_sync works
    supervises_engines = False  # restarts its dead or hung engines (rollout.health_interval_s, max_engine_restarts)
    starts_sglang = False  # launches sglang.launch_server: takes rollout.sglang_python / sglang_extra_args

    @classmethod
    def check_config(cls, r) -> None:
        """Validation of the rollout section for this backend (config.py): ValueError with one line naming the key
        and the fix."""
        if r.weight_sync != "auto" and r.weight_sync not in cls.weight_sync_modes:
            raise ValueError(refuse_weight_sync(r, [m for m in cls.weight_sync_modes if m != r.weight_sync]))
        for key in ("sglang_python", "sglang_extra_args"):
            if getattr(r, key) and not cls.starts_sglang:
                raise ValueError(f"rollout.{key} sets how this launch starts SGLang, and rollout.backend={cls.name} "
                                 f"starts none: unset it or use rollout.backend=sglang")

    @classmethod
    def plan_engines(cls, r, kind: str, engine_nodes: list, gpus_per_node: int) -> list:
        """The engines of a `kind` (colocated | disaggregated) placement on `engine_nodes`, as (node, gpus, port)
        in engine order; ValueError with one line naming the key and the fix when they do not fit."""
        raise ValueError(f"rollout.backend={cls.name} places no engines; use an external backend or another one")

    @classmethod
    def describe_engines(cls, plan) -> list:
        """Lines of `dapo-megatron plan` about this backend's engines (placement.Plan)."""
        return [f"engines: {len(plan.engines)} x rollout.backend={cls.name}"]

    @classmethod
    def weight_sync_mode_of(cls, r) -> str:
        return cls.default_weight_sync if r.weight_sync == "auto" else r.weight_sync

    @classmethod
    def planned_weight_sync_mode(cls, r) -> str:
        """The mode `dapo-megatron plan` shows for the cluster (a backend may pick by the cluster's devices)."""
        return cls.weight_sync_mode_of(r)

    @classmethod
    def weight_sync_class_of(cls, r):
        """The registered WeightSync (rollout/weight_sync.py) of rollout.weight_sync for this backend."""
        from .weight_sync import WEIGHT_SYNC_MODES

        mode = cls.weight_sync_mode_of(r)
        return WEIGHT_SYNC_MODES[cls.weight_sync_classes.get(mode, mode)]

    @classmethod
    def stage_weight_sender(cls, r, urls: list, api_key, pp_rank: int, version):
        """Distributed sync: the sender on pipeline stage `pp_rank`'s source rank (any rank, no backend instance)."""
        return cls.weight_sync_class_of(r).for_stage(r, urls, api_key, pp_rank, version)

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
        return self.weight_sync_mode_of(self.cfg)

    def weight_sync_class(self):
        return self.weight_sync_class_of(self.cfg)

    def make_weight_sync(self):
        """Rank 0's sync; None in distributed mode, where rank 0 only runs the session (pause ... continue) and each
        pipeline stage's source rank broadcasts its own tensors over its own group (train/stages.py)."""
        return self.weight_sync_class().for_backend(self)

    @contextlib.contextmanager
    def memory_released(self):
        yield

    def catch_up_from_disk(self, url=None) -> None:
        """Disk sync: an engine back from the dead (ours restarted, or someone else's) holds its start weights; it
        loads the last synced folder (`weights_v{N}`, the one kept) at its version. `url`: that engine, else every
        worker that answers (loading the same folder again is harmless). Version 0: nothing to load."""
        from .client import RolloutClient, run_sync
        from .weight_sync import synced_folder

        version = self.version.value
        if not version:
            return
        client = RolloutClient([url], api_key=self.api_key) if url else self.client
        run_sync(client.update_weights_from_disk(str(synced_folder(self.sync_dir, version)), weight_version=version,
                                                 timeout_s=self.cfg.weight_sync_timeout_s, strict=url is not None))

    def wait_for_unowned_engines(self, client, reached: bool = False) -> None:
        """Engines this process does not restart (someone else's, or another node's, which `dapo-megatron engines`
        restarts): with every one down, the client waits for one to answer /health again, at most
        rollout.engine_wait_s; with disk sync one that comes back is caught up (it may answer with other weights).
        `reached`: the start-up already waited for their /health (engine nodes of the plan), so they are waited for
        from the first request on; someone else's URLs only once one answered (a wrong URL fails fast)."""
        client.external_wait_s, client.reached = self.cfg.engine_wait_s, reached
        if self.weight_sync_mode() == "disk":
            client.catch_up = self.catch_up_from_disk

    def engine_restarts(self):
        """Engines restarted so far (the `rollout/engine_restarts` metric); None: this backend restarts none."""
        return None

    def shutdown(self):
        pass


@register("embedded")
class EmbeddedBackend(RolloutBackend):
    """The CPU engine in this process (tests, demo); weights arrive as tensors, bucket by bucket."""
    default_weight_sync = "tensor"
    weight_sync_modes = ("tensor", "disk")
    in_process_on_one_node = True
    serves_weights_digest = True

    @classmethod
    def plan_engines(cls, r, kind, engine_nodes, gpus_per_node):
        # one per node: in each trainer node's local rank 0, HTTP on a free port (colocated), or behind
        # `dapo-megatron engines` on each rollout node, at the port the trainer's URL names
        return [(n, [0], 0 if kind == "colocated" else r.sglang_base_port) for n in engine_nodes]

    @classmethod
    def describe_engines(cls, plan):
        remote, g = plan.engine_only_nodes(), plan.gpus_per_node
        if len(plan.engines) == 1 and not remote:
            return ["engines: 1 embedded engine inside global rank 0's process"]
        lines = [f"engines: {len(plan.engines)} embedded engines, one per node, HTTP" + ("" if remote else
                                                                                          " on a free port")]
        for e in plan.engines:
            where = (f"HTTP port {e.port}" if e.node in remote else
                     f"in global rank {plan.trainer_nodes.index(e.node) * g}'s process")
            lines.append(f"  engine {e.index}: node {e.node}, {where}")
        return lines

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
    external = True

    @classmethod
    def check_config(cls, r):
        if not r.urls:
            raise ValueError("rollout.backend=http needs rollout.urls (SGLang server or router URLs)")
        if r.host:
            raise ValueError(f"rollout.host={r.host} binds engines this launch starts; rollout.backend=http uses "
                             f"servers at rollout.urls: unset rollout.host")
        super().check_config(r)

    @classmethod
    def describe_engines(cls, plan):
        return [f"engines: external, {len(plan.urls)} URL(s): {' '.join(plan.urls)}"]

    def _start(self):
        from .client import RolloutClient

        client = RolloutClient(list(self.cfg.urls), **self.client_kw)
        self.wait_for_unowned_engines(client)  # not ours to restart
        return client


@register("sglang")
class SGLangBackend(RolloutBackend):
    """Real SGLang servers started by this rank on this node's GPUs (GPU only). Tensor weight sync hands CUDA IPC
    handles to the colocated server (weight_sync.CudaIpcWeightSync)."""
    weight_sync_modes = ("tensor", "disk", "distributed")
    weight_sync_classes = {"tensor": "cuda_ipc"}
    releases_memory_when_colocated = True
    starts_sglang = True
    supervises_engines = True  # with disk sync (a restarted server catches up from the last synced folder)

    @classmethod
    def check_config(cls, r):
        import dataclasses

        if r.weight_sync == "tensor" and not (r.colocate and r.sglang_num_servers == 1 and r.sglang_tp_size == 1):
            raise ValueError(refuse_weight_sync(r, ["disk", "distributed"]))
        defaults = {f.name: f.default for f in dataclasses.fields(r)}
        changed = [k for k in ("health_interval_s", "max_engine_restarts", "restart_window_s")
                   if getattr(r, k) != defaults[k]]
        if changed and cls.planned_weight_sync_mode(r) != "disk":
            raise ValueError(f"rollout.{changed[0]}: SGLang servers are supervised with rollout.weight_sync=disk only "
                             f"(a restarted one catches up from the last synced folder); use weight_sync=disk or "
                             f"unset it")
        super().check_config(r)
        cls._check_process(r)

    @classmethod
    def supervise(cls, cfg, servers, api_key):
        """Disk sync: this node's servers restarted when they die or hang, caught up from the last synced folder
        (docs/fault_tolerance.md). Tensor (CUDA IPC) and distributed sync: not supervised."""
        r = cfg.rollout
        if cls.weight_sync_mode_of(r) == "disk" and servers.processes:  # the servers start() started
            servers.supervise(catch_up=disk_catch_up(sync_dir(r, cfg.trainer.run_dir), api_key,
                                                     r.weight_sync_timeout_s),
                              health_interval_s=r.health_interval_s, max_restarts=r.max_engine_restarts,
                              window_s=r.restart_window_s)
        return servers

    @staticmethod
    def _check_process(r) -> None:
        """rollout.sglang_python / sglang_extra_args: how this launch starts SGLang."""
        from .sglang_launcher import OWNED_FLAGS

        py = r.sglang_python
        if py and not (os.path.isfile(py) and os.access(py, os.X_OK)):
            raise ValueError(f"rollout.sglang_python={py} is not an executable file; name the python of an "
                             f"environment that has sglang (e.g. tools/.venv-sglang/bin/python)")
        if not isinstance(r.sglang_extra_args, (list, tuple)) or not all(
                isinstance(a, (str, int, float)) and not isinstance(a, bool) for a in r.sglang_extra_args):
            raise ValueError(f"rollout.sglang_extra_args={r.sglang_extra_args!r}; use a list of flags and values, "
                             f"e.g. [--max-total-tokens, 4096]")
        r.sglang_extra_args = [str(a) for a in r.sglang_extra_args]
        owned = [a for a in r.sglang_extra_args if a.split("=", 1)[0] in OWNED_FLAGS]
        if owned:
            raise ValueError(f"rollout.sglang_extra_args sets {owned[0]}, which the launcher sets from the rollout "
                             f"config (rollout/sglang_launcher.py OWNED_FLAGS): use the rollout key instead")

    @classmethod
    def plan_engines(cls, r, kind, engine_nodes, gpus_per_node):
        etp, count = r.sglang_tp_size, r.sglang_num_servers
        if etp > gpus_per_node or gpus_per_node % etp:
            raise ValueError(f"rollout.sglang_tp_size={etp} must divide the {gpus_per_node} GPUs of a node "
                             f"(an engine stays inside a node)")
        if count % len(engine_nodes):
            raise ValueError(f"rollout.sglang_num_servers={count} must be a multiple of the {len(engine_nodes)} "
                             f"engine node(s) (each node starts the same number)")
        per_node = count // len(engine_nodes)
        if per_node * etp > gpus_per_node:
            raise ValueError(f"rollout.sglang_num_servers={count} x sglang_tp_size={etp} needs {count * etp} GPUs, "
                             f"more than the {len(engine_nodes) * gpus_per_node} of the engine node(s); use at most "
                             f"{len(engine_nodes) * gpus_per_node // etp} servers")
        if kind == "colocated" and cls.weight_sync_mode_of(r) == "distributed":
            raise ValueError("rollout.weight_sync=distributed with rollout.colocate=true puts a trainer rank and an "
                             "engine rank on one GPU in one NCCL group; use weight_sync=disk, or colocate=false "
                             "with rollout.rollout_nodes")
        from .sglang_launcher import PORT_STRIDE

        return [(engine_nodes[i // per_node], list(range(i % per_node * etp, (i % per_node + 1) * etp)),
                 r.sglang_base_port + PORT_STRIDE * (i % per_node)) for i in range(count)]

    @classmethod
    def describe_engines(cls, plan):
        return [f"engines: {len(plan.engines)} x SGLang TP {len(plan.engines[0].gpus)}"] + [
            f"  engine {e.index}: node {e.node} GPUs {e.gpus[0]}-{e.gpus[-1]} port {e.port}" for e in plan.engines]

    @classmethod
    def planned_weight_sync_mode(cls, r) -> str:
        """auto on the cluster a plan is for (GPUs): CUDA IPC to one colocated TP-1 server; disk otherwise."""
        if r.weight_sync == "auto" and r.colocate and r.sglang_num_servers == 1 and r.sglang_tp_size == 1:
            return "tensor"
        return super().weight_sync_mode_of(r)

    @classmethod
    def weight_sync_mode_of(cls, r) -> str:
        """What this machine runs: the planned mode, but disk instead of CUDA IPC on a machine without CUDA (CPU test
        servers), where there is no IPC handle to give."""
        import torch

        mode = cls.planned_weight_sync_mode(r)
        if r.weight_sync == "auto" and mode == "tensor" and not torch.cuda.is_available():
            return "disk"
        return mode

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
        client = servers.client(api_key=self.api_key, **kw)
        client.supervisor = servers.supervisor  # this node's servers, if supervised
        if servers.remote_worker_urls:  # other nodes' (`dapo-megatron engines` there restarts them): waited for
            self.wait_for_unowned_engines(client, reached=True)
        return client

    def engine_restarts(self):
        sup = getattr(self.servers, "supervisor", None)
        return sup.restarts if sup is not None else None

    @classmethod
    def start_engines(cls, cfg, engines: list, bind: str, url_host: str, api_key):
        from .sglang_launcher import servers_for

        # servers_for: the same command lines the sglang-parser test checks (tests/test_sglang_cpu.py); this node's
        # share, on the plan's GPUs and ports
        servers = servers_for(cfg.model.path, cfg.rollout, num_servers=len(engines), host=bind, url_host=url_host,
                              base_port=engines[0].port, base_gpu_id=engines[0].gpus[0], router=False,
                              seed=cfg.trainer.seed + engines[0].index, api_key=api_key)
        servers.urls = servers.local_urls
        return cls.supervise(cfg, servers.start(), api_key)

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


def import_backend_modules(folder=Path(__file__).parent, package=__name__.rpartition(".")[0]) -> list:
    """A backend beyond the three above is one module, `rollout/backend_<name>.py`, that `@register`s its class: every
    such module of `folder` is imported here, when this registry is (config validation and the plan read it)."""
    import importlib
    import pkgutil

    found = [m.name for m in pkgutil.iter_modules([str(folder)]) if m.name.startswith("backend_")]
    for name in found:
        importlib.import_module(f"{package}.{name}")
    return found


import_backend_modules()
