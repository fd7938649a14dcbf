"""Placement as data: which node and GPU runs every trainer rank and every rollout engine, validated before launch.

    dapo-megatron plan --config X --nodes N --gpus-per-node G [--print engine-nodes]

Three placements, read from the rollout section:
- colocated (`rollout.colocate: true`): engines share the trainer's GPUs on every node and release their memory while
  the actor trains; `sglang_num_servers / N` servers per node.
- disaggregated (`colocate: false`, `rollout.rollout_nodes: K`): the trainer on the first N - K nodes, the engines on
  the last K nodes, each engine `sglang_tp_size` GPUs (the embedded engine: one per node).
- external (`backend: http`): engines someone else runs, at `rollout.urls`.

Engines on a trainer node start with the trainer (`node_engine_hosts`, rollout/node_engines.py: `start_node_engines`):
that node's local rank 0 starts them, bound to `engine_bind_host`, and every rank learns all their URLs. The embedded
engine on several trainer nodes is one engine per node, in that node's local rank 0. Engines on a node with no
trainer rank (disaggregated) start there with `dapo-megatron engines` (rollout/node_engines.py;
launch/slurm/dapo.sbatch runs it as a second step); the trainer builds their URLs from the plan and the node host
list (`node_hosts`: $DAPO_NODE_HOSTS, else SLURM's node list) and waits for their /health.

Global trainer ranks follow megatron-core's order (TP fastest, then DP, then PP), node by node. A pipeline stage's
weight-sync source is its DP-0, TP-0 rank.
"""
import argparse
import sys
from dataclasses import dataclass, field

from .rollout.backends import BACKENDS

PORT_STRIDE = 10  # rollout/sglang_launcher.py: ports per server
SYNC_PORT_ENV_DEFAULT = 29600  # DAPO_WEIGHT_SYNC_PORT: stage p's group rendezvous on this + p


class PlacementError(ValueError):
    """An impossible placement; the message is one line naming the key and the fix."""


@dataclass
class Engine:
    index: int
    node: int
    gpus: list
    port: int


@dataclass
class Plan:
    kind: str  # colocated | disaggregated | external
    nodes: int
    gpus_per_node: int
    tp: int
    pp: int
    dp: int
    trainer_nodes: list
    engines: list = field(default_factory=list)
    urls: list = field(default_factory=list)
    sync_mode: str = "disk"
    bucket_mb: float = 512
    backend: str = "sglang"
    engine_tp: int = 1  # GPU ranks per engine (rollout.sglang_tp_size); external engines too

    def engine_only_nodes(self) -> list:
        """Nodes with engines and no trainer rank: `dapo-megatron engines` starts theirs."""
        return sorted({e.node for e in self.engines} - set(self.trainer_nodes))

    @property
    def trainer_world(self) -> int:
        return self.tp * self.pp * self.dp

    def stage_sources(self) -> list:
        return [p * self.tp * self.dp for p in range(self.pp)]

    def describe(self) -> str:
        g, lines = self.gpus_per_node, []
        lines.append(f"plan: {self.nodes} node(s) x {g} GPU(s), placement {self.kind}, weight sync {self.sync_mode}"
                     f" (buckets of {self.bucket_mb:g} MB)")
        lines.append(f"trainer: {self.trainer_world} ranks = TP {self.tp} x DP {self.dp} x PP {self.pp}")
        for n in self.trainer_nodes:
            lo = self.trainer_nodes.index(n) * g
            ranks = range(lo, min(lo + g, self.trainer_world))
            stages = sorted({r // (self.tp * self.dp) for r in ranks})
            lines.append(f"  node {n}: global ranks {ranks.start}-{ranks.stop - 1} on GPUs 0-{len(ranks) - 1}, "
                         f"PP stage(s) {','.join(map(str, stages))}")
        remote = self.engine_only_nodes()
        lines += BACKENDS[self.backend].describe_engines(self)  # rollout/backends.py: each backend's own words
        if remote:
            lines.append(f"engine-only node(s) {', '.join(map(str, remote))}: `dapo-megatron engines` starts theirs "
                         f"(the sbatch does), found via SLURM's node list or $DAPO_NODE_HOSTS")
        if self.sync_mode == "distributed":
            if self.kind == "external":
                target = (f"{len(self.urls) * self.engine_tp} engine GPU ranks ({len(self.urls)} rollout.urls x "
                          f"rollout.sglang_tp_size={self.engine_tp})")
            else:
                target = f"all {sum(len(e.gpus) for e in self.engines)} engine GPU ranks"
            for p, src in enumerate(self.stage_sources()):
                lines.append(f"sync group dapo_weight_sync_pp{p}: trainer rank {src} (stage {p}) -> {target}, "
                             f"rendezvous port {SYNC_PORT_ENV_DEFAULT + p}")
        elif self.sync_mode == "disk":
            lines.append("sync: stages stream buckets to rank 0, which writes rollout.weight_sync_dir; the engines "
                         "must share that filesystem")
        elif len(self.engines) > 1:
            hosts = sorted({self.trainer_nodes.index(e.node) * g for e in self.engines})
            lines.append(f"sync: every stage streams its buckets to each node's engine host (global ranks "
                         f"{', '.join(map(str, hosts))})")
        elif self.engines and self.engines[0].port == 0:
            lines.append("sync: stages stream buckets to rank 0's in-process engine")
        else:
            lines.append("sync: stages stream buckets to rank 0, which hands CUDA IPC handles to the engine on its GPU")
        return "\n".join(lines)


def make_plan(cfg, nodes: int, gpus_per_node: int) -> Plan:
    """The plan of `cfg` on `nodes` x `gpus_per_node`, or PlacementError naming the impossible part."""
    r, p = cfg.rollout, cfg.parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    if nodes < 1 or gpus_per_node < 1:
        raise PlacementError(f"--nodes {nodes} --gpus-per-node {gpus_per_node}: both must be >= 1")
    backend = BACKENDS[r.backend]
    kind = "external" if backend.external else "colocated" if r.colocate else "disaggregated"
    k = r.rollout_nodes if kind == "disaggregated" else 0
    if kind != "disaggregated" and r.rollout_nodes:
        raise PlacementError(f"rollout.rollout_nodes={r.rollout_nodes} is for disaggregated engines; "
                             f"set rollout.colocate=false or rollout.rollout_nodes=0")
    if kind == "disaggregated" and k < 1:
        raise PlacementError("rollout.colocate=false puts the engines on GPUs of their own, but "
                             "rollout.rollout_nodes=0 leaves them none: they would overlap the trainer; set "
                             "rollout.rollout_nodes (nodes for the engines) or rollout.colocate=true")
    if k >= nodes:
        raise PlacementError(f"rollout.rollout_nodes={k} leaves no node for the trainer on {nodes} node(s); "
                             f"use more nodes or fewer rollout nodes")
    trainer_nodes = list(range(nodes - k))
    trainer_gpus = len(trainer_nodes) * gpus_per_node
    if tp > gpus_per_node or gpus_per_node % tp:
        raise PlacementError(f"parallel.tensor_model_parallel_size={tp} must divide the {gpus_per_node} GPUs of a "
                             f"node (TP stays inside a node)")
    if tp * pp > trainer_gpus:
        raise PlacementError(f"TP {tp} x PP {pp} = {tp * pp} GPUs, more than the trainer's {trainer_gpus} "
                             f"({len(trainer_nodes)} node(s) x {gpus_per_node}); lower TP/PP or add nodes")
    if trainer_gpus % (tp * pp):
        raise PlacementError(f"the trainer's {trainer_gpus} GPUs are not a multiple of TP {tp} x PP {pp}")
    plan = Plan(kind, nodes, gpus_per_node, tp, pp, trainer_gpus // (tp * pp), trainer_nodes,
                sync_mode=backend.planned_weight_sync_mode(r), bucket_mb=r.weight_sync_bucket_mb, backend=r.backend,
                engine_tp=r.sglang_tp_size)
    if kind == "external":
        plan.urls = list(r.urls)
        if plan.sync_mode == "tensor":
            raise PlacementError("rollout.weight_sync=tensor needs the engine in the trainer's process "
                                 "(backend embedded); use disk or distributed with rollout.urls")
        return plan
    engine_nodes = trainer_nodes if kind == "colocated" else list(range(nodes - k, nodes))
    try:  # the backend sizes its engines (rollout/backends.py)
        placed = backend.plan_engines(r, kind, engine_nodes, gpus_per_node)
    except ValueError as e:
        raise PlacementError(str(e)) from None
    plan.engines = [Engine(i, node, gpus, port) for i, (node, gpus, port) in enumerate(placed)]
    return _check_remote_sync(plan)


def _check_remote_sync(plan: Plan) -> Plan:
    """Tensor sync streams over the trainer's process group: engines on nodes without a trainer rank are not in it."""
    remote = plan.engine_only_nodes()
    if remote and plan.sync_mode == "tensor":
        raise PlacementError(f"rollout.weight_sync=tensor (the embedded engine's default) streams over the trainer's "
                             f"process group, which the engines on node(s) {', '.join(map(str, remote))} (no trainer "
                             f"rank) are not in; use rollout.weight_sync=disk with rollout.weight_sync_dir on a "
                             f"filesystem those nodes share (SGLang engines: distributed)")
    return plan


def node_engine_hosts(plan: Plan) -> dict:
    """{global rank of a node's local rank 0: the engines the plan puts on that node}, for the trainer nodes with
    engines (none for external engines; engine-only nodes start theirs with `dapo-megatron engines`). A trainer node
    runs `gpus_per_node` ranks."""
    hosts: dict = {}
    for e in plan.engines if plan.kind != "external" else ():
        if e.node in plan.trainer_nodes:
            hosts.setdefault(plan.trainer_nodes.index(e.node) * plan.gpus_per_node, []).append(e)
    return hosts


def ordered_urls(urls_by_rank: list, hosts: dict, remote=()) -> list:
    """Every engine's URL in engine-index order, from each rank's list (all_gather_object of the hosts' URLs) and
    the (engine, URL) pairs of the engine-only nodes (`remote_engine_urls`)."""
    by_index = {e.index: u for e, u in remote}
    for rank, engines in hosts.items():
        urls = urls_by_rank[rank] or []
        if len(urls) != len(engines):
            raise RuntimeError(f"global rank {rank} started {len(urls)} engine(s), the plan puts {len(engines)} there")
        by_index.update({e.index: u for e, u in zip(engines, urls)})
    return [by_index[i] for i in sorted(by_index)]


def expand_nodelist(nodelist: str) -> list:
    """SLURM's compressed host list (`gpu[01-03,7],cpu-a`, as `scontrol show hostnames` expands it) in order."""
    hosts, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist + ","):
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            if nodelist[start:i]:
                hosts.extend(_expand_one(nodelist[start:i]))
            start = i + 1
    return hosts


def _expand_one(name: str) -> list:
    if "[" not in name:
        return [name]
    head, rest = name.split("[", 1)
    ranges, tail = rest.split("]", 1)
    out = []
    for part in ranges.split(","):
        lo, _, hi = part.partition("-")
        out.extend(f"{head}{n:0{len(lo)}d}" for n in range(int(lo), int(hi or lo) + 1))
    return [h + t for h in out for t in _expand_one(tail)]


def node_hosts(env=None) -> tuple:
    """(host of every node of the job in node order, where the list came from): $DAPO_NODE_HOSTS (comma-separated;
    torchrun users), else $SLURM_JOB_NODELIST; (None, None) when neither is set."""
    import os

    env = os.environ if env is None else env
    if env.get("DAPO_NODE_HOSTS"):
        return [h.strip() for h in env["DAPO_NODE_HOSTS"].split(",") if h.strip()], "$DAPO_NODE_HOSTS"
    if env.get("SLURM_JOB_NODELIST"):
        return expand_nodelist(env["SLURM_JOB_NODELIST"]), "$SLURM_JOB_NODELIST"
    return None, None


def remote_engine_urls(plan: Plan, hosts, source) -> list:
    """[(engine, URL)] of the engines on nodes with no trainer rank, from the node host list."""
    remote = [e for e in plan.engines if e.node not in plan.trainer_nodes] if plan.kind != "external" else []
    if not remote:
        return []
    nodes = ", ".join(map(str, plan.engine_only_nodes()))
    if hosts is None:
        raise PlacementError(f"the engines on node(s) {nodes} run no trainer rank and the trainer cannot find them: "
                             f"set $DAPO_NODE_HOSTS=host0,host1,... (every node of the plan, in order) or run under "
                             f"SLURM")
    if len(hosts) != plan.nodes:
        raise PlacementError(f"{source} names {len(hosts)} host(s), the plan has {plan.nodes} nodes; list every node "
                             f"(trainer nodes first), in order")
    return [(e, f"http://{hosts[e.node]}:{e.port}") for e in remote]


LOOPBACK = ("127.", "localhost", "::1")
ANY_ADDRESS = ("0.0.0.0", "::")


def engine_bind_host(setting, nodes: int, env_host=None, node_address=None) -> tuple:
    """(address the engines bind, address the other nodes use in their URLs) for this node.

    `setting`: rollout.host (one value for every node); `env_host`: $DAPO_ROLLOUT_HOST (set per node); `node_address`:
    this node's hostname resolved (as slime and verl find a node's IP), a callable. One node: loopback by default.
    Several nodes: $DAPO_ROLLOUT_HOST, else the node's own address; a config address every node would share is
    refused, as is an unreachable loopback one."""
    if setting and env_host and setting != env_host:
        raise PlacementError(f"rollout.host={setting} and $DAPO_ROLLOUT_HOST={env_host} disagree; set one of them")
    value = env_host or setting
    if nodes > 1 and setting and not env_host and setting not in ANY_ADDRESS:
        raise PlacementError(f"rollout.host={setting} would be the one address of all {nodes} nodes; leave it unset "
                             f"(each node binds its own address: $DAPO_ROLLOUT_HOST, else its hostname's) or use "
                             f"0.0.0.0")
    if nodes == 1:
        bind = value or "127.0.0.1"
        return bind, ("127.0.0.1" if bind in ANY_ADDRESS else bind)
    if value and value not in ANY_ADDRESS:
        return value, value
    here = node_address()
    if here.startswith(LOOPBACK):
        raise PlacementError(f"this node's hostname resolves to {here}, which the other nodes cannot reach; set "
                             f"$DAPO_ROLLOUT_HOST to this node's address")
    return (value or here), here


def local_world_size(world_size: int) -> int:
    """Ranks per node of this launch: torchrun's LOCAL_WORLD_SIZE, SLURM's tasks per node, else one node."""
    import os

    for var in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return world_size


def launch_plan(cfg, world_size: int, local_world: int) -> Plan:
    """The plan of this launch: its trainer nodes (plus the rollout nodes of a disaggregated placement)."""
    nodes = max(1, world_size // max(1, local_world)) + (cfg.rollout.rollout_nodes if not cfg.rollout.colocate
                                                        and not BACKENDS[cfg.rollout.backend].external else 0)
    return make_plan(cfg, nodes, local_world)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="dapo-megatron plan", description="Print where every trainer rank and rollout "
                                 "engine runs, the weight-sync groups and each pipeline stage's peak GPU memory; "
                                 "refuse an impossible placement or one over --gpu-memory-gib (exit 2).")
    ap.add_argument("--config", required=True)
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--gpus-per-node", type=int, required=True)
    ap.add_argument("--print", choices=["plan", "engine-nodes"], default="plan", dest="what",
                    help="engine-nodes: only the indices of the nodes with engines and no trainer rank, one line "
                         "(launch/slurm/dapo.sbatch starts `dapo-megatron engines` there)")
    ap.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (default 80)")
    ap.add_argument("--json", action="store_true", help="print the plan and the memory estimate as one JSON object")
    ap.add_argument("--model-config", help="the model's HF config.json when model.path is not on this machine "
                                           "(default: model.path/config.json, else hf_config.json beside --config)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, as for train (e.g. actor.micro_batch_size=2)")
    args = ap.parse_args(argv)
    from .config import build_config

    cfg = build_config(args.config, args.overrides)
    plan = make_plan(cfg, args.nodes, args.gpus_per_node)
    if args.what == "engine-nodes":
        print(" ".join(map(str, plan.engine_only_nodes())))
        return
    if not args.gpu_memory_gib > 0:
        raise PlacementError(f"--gpu-memory-gib {args.gpu_memory_gib:g}: give the memory of one GPU in GiB (> 0)")
    arch, source = model_arch(cfg, args.config, args.model_config)
    memory = None
    if arch is not None:
        from . import memory as mem

        memory = mem.estimate(arch, mem.shape_of(cfg, arch, plan.trainer_world, on_gpu=True,
                                                 gpu_gib=args.gpu_memory_gib))
    if args.json:
        import dataclasses
        import json

        out = dataclasses.asdict(plan)
        out["trainer_world"] = plan.trainer_world
        out["memory"] = memory.to_json() if memory is not None else None
        print(json.dumps(out))
    else:
        print(plan.describe())
        print(memory.describe() + f"\n  model config: {source}" if memory is not None else
              f"memory: not estimated: {source}")
    sys.stdout.flush()
    if memory is not None and not memory.fits:
        raise MemoryPlanError(mem.refusal(arch, memory))


class MemoryPlanError(PlacementError):
    """The plan does not fit the GPUs' memory; the message names the stage, the largest term and the fixes."""


def model_arch(cfg, config_path, model_config=None) -> tuple:
    """(ModelArch or None, where its config came from / why there is none): --model-config, else model.path, else
    the recipe's own hf_config.json (the recipes ship their models' config.json, so plan runs without the weights)."""
    from pathlib import Path

    from .models.hf_config import arch_from_hf, load_hf_config

    if model_config:
        path = Path(model_config) / "config.json" if Path(model_config).is_dir() else Path(model_config)
        if not path.is_file():
            raise PlacementError(f"--model-config {model_config}: no such file; give the model's HF config.json")
        return arch_from_hf(load_hf_config(path)), str(path)
    candidates = []
    if cfg.model.path:
        candidates.append(Path(cfg.model.path) / "config.json")
    if config_path:
        candidates.append(Path(config_path).parent / "hf_config.json")
    for path in candidates:
        if path.is_file():
            return arch_from_hf(load_hf_config(path)), str(path)
    return None, (f"no config.json at model.path={cfg.model.path or '(unset)'} nor hf_config.json beside the config; "
                  "pass --model-config FILE")


def startup_plan(cfg, world_size: int, local_world_size: int) -> str:
    """The plan of this launch and its memory estimate (printed by rank 0 at start-up); a placement problem is
    reported, not raised, and an estimate over the device's memory is a warning (the estimate can be wrong)."""
    try:
        text = launch_plan(cfg, world_size, local_world_size).describe()
    except PlacementError as e:
        text = f"plan: {e}"
    return text + "\n" + startup_memory(cfg, world_size)


def startup_memory(cfg, world_size: int) -> str:
    from . import memory as mem

    try:
        import torch

        on_gpu = torch.cuda.is_available()
        gib = torch.cuda.get_device_properties(0).total_memory / mem.GIB if on_gpu else float("inf")
        arch, _ = model_arch(cfg, None)
        if arch is None:
            return "memory: not estimated (model.path has no config.json)"
        plan = mem.estimate(arch, mem.shape_of(cfg, arch, world_size, on_gpu=on_gpu, gpu_gib=gib))
    except (ValueError, OSError) as e:  # the run itself reports a bad model config, in its own words
        return f"memory: not estimated ({e})"
    text = plan.describe()
    if on_gpu and not plan.fits:
        text += f"\nWARNING: the memory estimate is over this GPU: {mem.refusal(arch, plan)}"
    return text
