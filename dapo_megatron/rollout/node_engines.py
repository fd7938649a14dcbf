"""Engines on a node with no trainer rank: `dapo-megatron engines`, and the trainer's wait for them.

    DAPO_ROLLOUT_API_KEY=... dapo-megatron engines --config X --nodes N --gpus-per-node G [--node-rank I] [overrides]

Reads the plan (placement.py) of N nodes x G GPUs (the trainer's N and ranks per node), finds this node's index
(`--node-rank`, else this host's place in SLURM's job node list, else $NODE_RANK) and starts exactly the engines the
plan puts here, as a trainer node's local rank 0 would (`RolloutBackend.start_engines`: SGLang servers on the plan's
GPUs and ports; on CPU the embedded engine behind its HTTP server on the plan's port, in this process (`embedded`) or
in processes of their own (`embedded_http`)), bound to this node's address (placement.engine_bind_host). Prints one
line per engine with its URL, then serves until SIGTERM or SIGINT and shuts the engines down. Engines a supervisor
watches (SGLang with disk sync, embedded_http) are restarted when they die or hang and caught up from the newest
synced folder (docs/fault_tolerance.md); this command exits 2 in one line only when the supervisor gives up. The
trainer waits for them meanwhile (rollout.engine_wait_s) and catches a returning one up itself too. SIGUSR1 (the
preemption notice that SLURM and the sbatch send the whole job) is ignored: the trainer saves, and the sbatch stops
this step after it.

The API key must be the trainer's: rollout.api_key or $DAPO_ROLLOUT_API_KEY, set for both (the sbatch makes one per
job); a generated key could not match, so none is generated here. The trainer builds these engines' URLs from the
plan and the node host list and waits for their /health (rollout/engine_health.py).

`start_node_engines` is the trainer side, collective at start-up: each trainer node's local rank 0 starts what the plan
puts on its node (the same `start_engines`), and every rank gets all nodes' URLs.
"""
import argparse
import os
import signal
import socket
import sys
import threading


def node_index(arg, env=None) -> tuple:
    """(this node's index in the plan, where it came from): `--node-rank`, else this host ($SLURMD_NODENAME, as
    SLURM names it) in $SLURM_JOB_NODELIST (the job's nodes, the trainer's order; $SLURM_NODEID counts the nodes of
    this step only), else $NODE_RANK (torchrun's)."""
    from ..placement import PlacementError, expand_nodelist

    env = os.environ if env is None else env
    if arg is not None:
        return arg, "--node-rank"
    if env.get("SLURM_JOB_NODELIST") and env.get("SLURMD_NODENAME"):
        hosts = expand_nodelist(env["SLURM_JOB_NODELIST"])
        if env["SLURMD_NODENAME"] not in hosts:
            raise PlacementError(f"$SLURMD_NODENAME={env['SLURMD_NODENAME']} is not in $SLURM_JOB_NODELIST; pass "
                                 f"--node-rank")
        return hosts.index(env["SLURMD_NODENAME"]), "SLURM's node list"
    if env.get("NODE_RANK", "").isdigit():
        return int(env["NODE_RANK"]), "$NODE_RANK"
    raise PlacementError("which node is this? pass --node-rank I (or run under SLURM, or set $NODE_RANK)")


def engines_here(plan, node: int, source: str) -> list:
    """The engines the plan puts on `node`, or PlacementError saying why this command starts none there."""
    from ..placement import PlacementError

    if not 0 <= node < plan.nodes:
        raise PlacementError(f"node {node} (from {source}) is out of range: the plan has nodes 0-{plan.nodes - 1}")
    if plan.kind == "external":
        raise PlacementError("rollout.backend=http uses engines at rollout.urls; this launch starts none")
    if node in plan.trainer_nodes:
        raise PlacementError(f"node {node} runs trainer ranks: its engines start with `dapo-megatron train`; run "
                             f"`dapo-megatron engines` only on node(s) "
                             f"{', '.join(map(str, plan.engine_only_nodes())) or '(none in this plan)'}")
    mine = [e for e in plan.engines if e.node == node]
    if not mine:
        raise PlacementError(f"the plan puts no engine on node {node}; see `dapo-megatron plan`")
    return mine


def start_node_engines(cfg) -> "NodeEngines":
    """Collective, once at start-up: each trainer node's local rank 0 starts the engines the plan puts on its node,
    bound to its address (placement.engine_bind_host); engines on nodes with no trainer rank (`dapo-megatron
    engines` runs them) are found from the node host list (placement.node_hosts) and waited for. Every rank gets
    every URL in engine order. The run's API key is produced here and nowhere else, once, on global rank 0
    (`run_api_key`), and shared with the other nodes' engines; engine-only nodes need it configured, the same on both
    sides. One node with the embedded engine: nothing is started here (the backend builds its in-process engine);
    external engines: rollout.urls. Without a process group (`dapo-megatron eval`, one process) only those two."""
    import torch.distributed as dist

    from ..config import ConfigError
    from ..placement import PlacementError, engine_bind_host, launch_plan, local_world_size, node_engine_hosts, \
        node_hosts, ordered_urls, remote_engine_urls
    from .backends import BACKENDS, NodeEngines, configured_api_key, run_api_key

    r, grouped = cfg.rollout, dist.is_initialized()
    world, rank = (dist.get_world_size(), dist.get_rank()) if grouped else (1, 0)
    key = run_api_key(cfg) if rank == 0 else None
    backend = BACKENDS[r.backend]
    local = local_world_size(world)
    if backend.external:
        return NodeEngines(urls=r.urls, api_key=key)
    try:  # the same on every rank: all raise, none waits
        plan = launch_plan(cfg, world, local)
    except PlacementError as e:
        raise ConfigError(str(e)) from None
    hosts, remote_nodes = node_engine_hosts(plan), plan.engine_only_nodes()
    if backend.in_process_on_one_node and world <= local and not remote_nodes:
        if r.host:
            raise ConfigError(f"rollout.host={r.host}: the embedded engine of a one-node run lives in rank 0's "
                              f"process and binds nothing; unset rollout.host (it applies to SGLang servers and "
                              f"multi-node engines)")
        return NodeEngines(api_key=key)
    if not grouped:
        raise ConfigError(f"rollout.backend={r.backend} engines start with the trainer (`dapo-megatron train`); to "
                          f"evaluate alone, run them and use rollout.backend=http with rollout.urls")
    box = [(configured_api_key(cfg), key) if rank == 0 else None]
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
            started = backend.start_engines(cfg, hosts[rank], bind, url_host, key)
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


def main(argv=None):
    ap = argparse.ArgumentParser(prog="dapo-megatron engines", description="Start the rollout engines the plan "
                                 "puts on this node (one with no trainer rank) and serve until SIGTERM/SIGINT.")
    ap.add_argument("--config", required=True)
    ap.add_argument("--nodes", type=int, required=True, help="nodes of the plan (the trainer's and the engines')")
    ap.add_argument("--gpus-per-node", type=int, required=True, help="the trainer's ranks per node")
    ap.add_argument("--node-rank", type=int, default=None, help="this node's index (default: from SLURM, $NODE_RANK)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    from ..config import ConfigError, build_config
    from ..placement import PlacementError, engine_bind_host, make_plan
    from .backends import BACKENDS, configured_api_key

    cfg = build_config(args.config, args.overrides)
    try:
        plan = make_plan(cfg, args.nodes, args.gpus_per_node)
        node, source = node_index(args.node_rank)
        mine = engines_here(plan, node, source)
        bind, url_host = engine_bind_host(cfg.rollout.host, plan.nodes, os.environ.get("DAPO_ROLLOUT_HOST"),
                                          lambda: socket.gethostbyname(socket.gethostname()))
    except PlacementError as e:
        raise ConfigError(str(e)) from None
    key = configured_api_key(cfg)
    if not key:
        raise ConfigError("dapo-megatron engines needs the trainer's API key: set $DAPO_ROLLOUT_API_KEY (or "
                          "rollout.api_key) to the same value for both (launch/slurm/dapo.sbatch makes one per job)")
    stop = threading.Event()
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # preemption is the trainer's business; stopped after it
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        started = BACKENDS[cfg.rollout.backend].start_engines(cfg, mine, bind, url_host, key)
    except (RuntimeError, OSError) as e:  # a port in use, a server that exits: the user's to fix, in one line
        raise ConfigError(f"node {node} could not start its engines: {' '.join(str(e).split())[:500]}") from None
    try:
        for e, url in zip(mine, started.urls):
            print(f"engine {e.index}: {url} (node {node}, backend {cfg.rollout.backend})", flush=True)
        # restarts an engine that dies or hangs: SGLang servers with disk sync, the embedded_http engines (which are
        # the supervisor itself)
        supervisor = started if hasattr(started, "failure") else getattr(started, "supervisor", None)
        while not stop.wait(5.0):
            if supervisor is not None:
                if supervisor.failure:
                    print(f"dapo-megatron engines: {supervisor.failure}", file=sys.stderr, flush=True)
                    return 2
                continue
            dead = [n for n, (p, _) in getattr(started, "processes", {}).items() if p.poll() is not None]
            if dead:
                print(f"dapo-megatron engines: {dead[0]} exited; stopping this node's engines", file=sys.stderr,
                      flush=True)
                return 1
    finally:
        started.shutdown()
        for s, h in previous.items():
            signal.signal(s, h)
    print(f"engines on node {node} stopped", flush=True)
    return 0
