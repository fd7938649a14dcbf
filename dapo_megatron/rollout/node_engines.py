"""Engines on a node with no trainer rank: `dapo-megatron engines`, and the trainer's wait for them.

    DAPO_ROLLOUT_API_KEY=... dapo-megatron engines --config X --nodes N --gpus-per-node G [--node-rank I] [overrides]

Reads the plan (placement.py) of N nodes x G GPUs (the trainer's N and ranks per node), finds this node's index
(`--node-rank`, else this host's place in SLURM's job node list, else $NODE_RANK) and starts exactly the engines the
plan puts here, as a trainer node's local rank 0 would (`RolloutBackend.start_engines`: SGLang servers on the plan's
GPUs and ports; on CPU the embedded engine behind its HTTP server on the plan's port), bound to this node's address
(placement.engine_bind_host). Prints one line per engine with its URL, then serves until SIGTERM or SIGINT and shuts
the engines down. SIGUSR1 (the preemption notice that SLURM and the sbatch send the whole job) is ignored: the
trainer saves, and the sbatch stops this step after it.

The API key must be the trainer's: rollout.api_key or $DAPO_ROLLOUT_API_KEY, set for both (the sbatch makes one per
job); a generated key could not match, so none is generated here. The trainer builds these engines' URLs from the
plan and the node host list and waits for their /health (rollout/engine_health.py).
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
        while not stop.wait(5.0):
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
