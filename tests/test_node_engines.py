"""Engines per node, as pure functions over the plan: which rank starts which engines on which GPUs and ports, the
address they bind, and the full URL list rank 0's client gets. (The two-node run is tests/test_two_nodes.py.)"""
from pathlib import Path

import pytest

from dapo_megatron.config import build_config
from dapo_megatron.placement import PlacementError, engine_bind_host, make_plan, node_engine_hosts, ordered_urls

REPO = Path(__file__).resolve().parents[1]
R32, R7 = "examples/dapo_qwen2.5_32b/config.yaml", "examples/dapo_qwen2.5_7b/config.yaml"


def _where(hosts):
    return {rank: [(e.index, e.node, e.gpus, e.port) for e in engines] for rank, engines in hosts.items()}


def test_colocated_sglang_on_two_nodes_each_local_rank0_starts_its_share():
    plan = make_plan(build_config(str(REPO / R7)), 2, 8)  # 4 servers x TP 2 over 2 nodes x 8 GPUs
    assert _where(node_engine_hosts(plan)) == {
        0: [(0, 0, [0, 1], 30000), (1, 0, [2, 3], 30010)],
        8: [(2, 1, [0, 1], 30000), (3, 1, [2, 3], 30010)]}


def test_embedded_engine_one_per_node_and_single_node_in_process():
    cfg = build_config(None, [])
    assert _where(node_engine_hosts(make_plan(cfg, 2, 1))) == {0: [(0, 0, [0], 0)], 1: [(1, 1, [0], 0)]}
    assert _where(node_engine_hosts(make_plan(cfg, 3, 2))) == {0: [(0, 0, [0], 0)], 2: [(1, 1, [0], 0)],
                                                               4: [(2, 2, [0], 0)]}
    one = make_plan(cfg, 1, 1)
    assert len(one.engines) == 1 and "inside global rank 0's process" in one.describe()
    two = make_plan(cfg, 2, 1).describe()
    assert "2 embedded engines, one per node" in two and "each node's engine host (global ranks 0, 1)" in two


def test_disaggregated_engines_start_on_their_own_nodes_and_external_start_nothing():
    # the trainer starts none of them: `dapo-megatron engines` does, there (tests/test_engine_nodes.py)
    assert node_engine_hosts(make_plan(build_config(str(REPO / R32)), 4, 8)) == {}
    ext = make_plan(build_config(None, ["rollout.backend=http", "rollout.urls=[http://a:1]",
                                        "rollout.weight_sync=disk"]), 2, 8)
    assert node_engine_hosts(ext) == {}


def test_gathered_urls_come_back_in_engine_order():
    hosts = node_engine_hosts(make_plan(build_config(str(REPO / R7)), 2, 8))
    per_rank = [None] * 16
    per_rank[8] = ["http://10.0.0.2:30000", "http://10.0.0.2:30010"]
    per_rank[0] = ["http://10.0.0.1:30000", "http://10.0.0.1:30010"]
    assert ordered_urls(per_rank, hosts) == ["http://10.0.0.1:30000", "http://10.0.0.1:30010",
                                             "http://10.0.0.2:30000", "http://10.0.0.2:30010"]
    per_rank[8] = per_rank[8][:1]
    with pytest.raises(RuntimeError, match="global rank 8 started 1 engine"):
        ordered_urls(per_rank, hosts)


def test_bind_host_per_node_and_one_line_refusals():
    addr = lambda: "10.0.0.7"  # noqa: E731 - this node's hostname, resolved
    assert engine_bind_host(None, 1, None, addr) == ("127.0.0.1", "127.0.0.1")
    assert engine_bind_host("0.0.0.0", 1, None, addr) == ("0.0.0.0", "127.0.0.1")
    assert engine_bind_host(None, 2, None, addr) == ("10.0.0.7", "10.0.0.7")
    assert engine_bind_host("0.0.0.0", 2, None, addr) == ("0.0.0.0", "10.0.0.7")
    assert engine_bind_host(None, 2, "10.1.1.1", addr) == ("10.1.1.1", "10.1.1.1")  # set per node: its own
    for setting, env, node_ip, message in [
            ("10.0.0.5", None, "10.0.0.7", "rollout.host=10.0.0.5 would be the one address of all 2 nodes"),
            (None, None, "127.0.1.1", "resolves to 127.0.1.1, which the other nodes cannot reach"),
            ("10.0.0.5", "10.0.0.6", "10.0.0.7", "disagree; set one of them")]:
        with pytest.raises(PlacementError, match=message) as e:
            engine_bind_host(setting, 2, env, lambda: node_ip)
        assert "\n" not in str(e.value)


def test_sglang_node_share_command_lines_and_rank0_client_gets_every_url(monkeypatch):
    from dapo_megatron.rollout import sglang_launcher
    from dapo_megatron.rollout.backends import NodeEngines, SGLangBackend

    monkeypatch.setattr(sglang_launcher.SGLangServers, "start", lambda self: self)  # command lines only
    cfg = build_config(str(REPO / R7))
    hosts = node_engine_hosts(make_plan(cfg, 2, 8))
    node1 = SGLangBackend.start_engines(cfg, hosts[8], "0.0.0.0", "10.0.0.2", "k")
    cmd = node1.server_command(1)
    assert cmd[cmd.index("--base-gpu-id") + 1] == "2" and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert cmd[cmd.index("--port") + 1] == "30010" and cmd[cmd.index("--tp-size") + 1] == "2"
    assert node1.urls == ["http://10.0.0.2:30000", "http://10.0.0.2:30010"]
    node0 = SGLangBackend.start_engines(cfg, hosts[0], "10.0.0.1", "10.0.0.1", "k")
    urls = node0.urls + node1.urls
    backend = SGLangBackend(cfg.rollout, model_path="m", seed=0, run_dir="r", api_key="k",
                            engines=NodeEngines([0, 8], urls, api_key="k", servers=node0))
    assert backend.client.worker_urls == urls and backend.servers.worker_urls == urls  # control calls reach all


def test_rollout_host_is_refused_where_nothing_binds():
    from dapo_megatron.config import ConfigError

    with pytest.raises(ConfigError, match="rollout.backend=http uses servers at rollout.urls: unset rollout.host"):
        build_config(None, ["rollout.backend=http", "rollout.urls=[http://a:1]", "rollout.host=0.0.0.0"])
    import torch.distributed as dist

    from dapo_megatron.rollout.node_engines import start_node_engines
    from dapo_megatron.rollout.server import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        with pytest.raises(ConfigError, match="lives in rank 0's process and binds nothing; unset rollout.host"):
            start_node_engines(build_config(None, ["rollout.host=0.0.0.0"]))
        one = start_node_engines(build_config(None, ["rollout.api_key=k"]))  # one node: the in-process engine
        assert (one.host_ranks, one.urls, one.api_key) == ([], [], "k")
    finally:
        dist.destroy_process_group()
