"""`rollout.backend=embedded_http`: the embedded engine as an HTTP server in a process of its own, started and
supervised by this launch (docs/fault_tolerance.md).

`rollout.sglang_num_servers` engines (default 1) on one node, killable apart from the trainer: the trainer's node, or an
engines-only node (`dapo-megatron engines` starts and supervises them there; the trainer waits for them while they
restart, `RolloutBackend.wait_for_unowned_engines`). Each one's process and `/health` are watched
every `rollout.health_interval_s`, a generate past `rollout.request_timeout_s` counts as hung, and a dead or hung
engine is killed by its PID, started again with the same arguments, caught up and put back behind the client
(rollout/supervisor.py: `EngineSupervisor`). Weights arrive by disk sync, so catching a new engine up is loading
the last synced folder (`weights_v{N}` under rollout.weight_sync_dir) at its version. More than
`rollout.max_engine_restarts` restarts within `rollout.restart_window_s` stop the run in one line.
"""
import os

from ..train.faults import ENGINE_INDEX_ENV
from .backends import RolloutBackend, disk_catch_up, register, sync_dir


@register("embedded_http")
class EmbeddedHttpBackend(RolloutBackend):
    default_weight_sync = "disk"
    weight_sync_modes = ("disk",)
    serves_weights_digest = True
    supervises_engines = True

    @classmethod
    def check_config(cls, r):
        if r.deterministic:
            raise ValueError("rollout.deterministic=true needs the in-process engine; with rollout.backend="
                             "embedded_http unset it, or use rollout.backend=embedded")
        super().check_config(r)

    @classmethod
    def plan_engines(cls, r, kind, engine_nodes, gpus_per_node):
        from .sglang_launcher import PORT_STRIDE

        if len(engine_nodes) != 1:
            raise ValueError(f"rollout.backend=embedded_http runs its engines on the one node of the run, not on "
                             f"{len(engine_nodes)} nodes; use rollout.backend=embedded (one per node)")
        if r.sglang_num_servers < 1:
            raise ValueError(f"rollout.sglang_num_servers={r.sglang_num_servers}; use 1 or more engines")
        # rollout.sglang_num_servers engines on the node, CPU processes (no GPU is given to them)
        return [(engine_nodes[0], [0], 0 if kind == "colocated" else r.sglang_base_port + PORT_STRIDE * i)
                for i in range(r.sglang_num_servers)]

    @classmethod
    def describe_engines(cls, plan):
        n = len(plan.engines)
        return [f"engines: {n} embedded engine(s), each in a process of its own, HTTP, supervised (restarted when "
                f"it dies)"]

    @classmethod
    def start_engines(cls, cfg, engines: list, bind: str, url_host: str, api_key):
        from .supervisor import EngineSupervisor
        from .server import free_port, launch_embedded_server

        r = cfg.rollout
        ports = [e.port or free_port(bind) for e in engines]  # fixed: a restarted engine keeps its URL

        def launch(i, env):  # env: a restarted engine's (without DAPO_FAULT); its index for `<point>@<N>:<engine>`
            env = {**(os.environ if env is None else env), ENGINE_INDEX_ENV: str(engines[i].index)}
            return launch_embedded_server(cfg.model.path, ports[i], host=bind, mode="subprocess", api_key=api_key,
                                          weights_root=sync_dir(r, cfg.trainer.run_dir), env=env,
                                          max_batch_size=r.engine_max_batch_size,
                                          seed=cfg.trainer.seed + engines[i].index)

        # catch-up on any node (an engines-only node has no trainer state): the newest synced folder; the trainer's
        # node replaces it with its own version's (_start)
        supervisor = EngineSupervisor(launch, len(engines), catch_up=disk_catch_up(
            sync_dir(r, cfg.trainer.run_dir), api_key, r.weight_sync_timeout_s), health_interval_s=r.health_interval_s,
            max_restarts=r.max_engine_restarts, window_s=r.restart_window_s)
        supervisor.urls = [f"http://{url_host}:{p}" for p in ports]  # as the other nodes reach them
        return supervisor

    def _start(self):
        from .client import RolloutClient

        self.supervisor = self.engines.servers  # None: on a node of their own, `dapo-megatron engines` restarts them
        client = RolloutClient(self.engines.urls, **self.client_kw)
        if self.supervisor is None:
            self.wait_for_unowned_engines(client, reached=True)  # start-up waited for their /health
        else:
            self.supervisor.catch_up = self.catch_up_from_disk
            client.supervisor = self.supervisor
        return client

    def engine_restarts(self):
        return self.supervisor.restarts if self.supervisor is not None else None
