"""`dapo-megatron engines` starting the real PyPI sglang server on an engines-only node, in a localhost two-node run:
node 1 runs only `dapo-megatron engines` (real sglang on CPU, on the plan's port), node 0 the trainer (PP=2 under
torchrun). The trainer finds the engine from the plan and $DAPO_NODE_HOSTS, waits for its /health with the shared
API key, generates on it and syncs weights to it by disk through rollout.weight_sync_dir; after 3 steps sglang serves
weight version 3 and the train/inference log-prob gap stayed small at every step. SIGTERM stops the engines node and
its server. Needs tools/.venv-sglang (skipped with that message otherwise).
"""
import json
import secrets
import threading

import pytest

from dapo_megatron.rollout.sglang_launcher import free_port_block
from tests.sglang_real import TOOLS_PY, kill_servers_after_sync, needs_server_venv
from tests.test_engine_node_run import _wait_for_line, node_envs, served_version, start_engines_node, \
    stop_engines_node, train_node0
from tests.test_sglang_cpu_train import servers_of
from tests.test_trainer import _args, toy  # noqa: F401 (toy is a fixture)

pytestmark = [pytest.mark.sglang_cpu, needs_server_venv, pytest.mark.timeout(1500)]


def placement_of(shared, port) -> list:
    return ["rollout.backend=sglang", f"rollout.sglang_python={TOOLS_PY}", "rollout.deterministic=false",
            "rollout.sglang_mem_fraction_static=0.1", "rollout.sglang_extra_args=[--max-total-tokens, 4096]",
            "rollout.colocate=false", "rollout.rollout_nodes=1", "rollout.weight_sync=disk",
            f"rollout.weight_sync_dir={shared}", f"rollout.sglang_base_port={port}", "rollout.engine_wait_s=600",
            "actor.recompute_old_logprobs=true"]


def test_engines_node_runs_real_sglang_for_the_trainer(toy, tmp_path):  # noqa: F811
    shared, port, key = tmp_path / "shared_sync", free_port_block(), secrets.token_hex(16)
    placement = placement_of(shared, port)
    env = node_envs(tmp_path, key)

    def args(node):
        return _args(toy, tmp_path / f"node{node}" / "run", steps=3, pp=2, extra=placement)

    log1 = tmp_path / "node1" / "engines.log"
    engines = start_engines_node(args(1), log1, tmp_path / "node1", env[1])
    try:
        printed = _wait_for_line(engines, log1, "engine 0: ", 600)
        assert f"engine 0: http://127.0.0.1:{port} (node 1, backend sglang)" in printed and key not in printed
        assert servers_of(toy[0]), "no real sglang server runs for the engines node"
        out = train_node0(args(0), env[0], tmp_path, log1)
        assert served_version(port, key, "/model_info") == "3"  # the engines node serves the last sync
    finally:
        rc_engines = stop_engines_node(engines, 120)
    assert rc_engines == 0 and "engines on node 1 stopped" in log1.read_text(), log1.read_text()[-3000:]
    assert servers_of(toy[0]) == [], "the real sglang server outlived its engines node"
    assert key not in out and key not in log1.read_text()
    rows = [json.loads(x) for x in (tmp_path / "node0" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:  # float32 on both sides: the served weights are the trainer's after every disk sync
        assert r["rollout/train_infer_logprob_diff_max"] < 1e-4 and r["sync/gb"] > 0, r
    assert sorted(p.name for p in shared.iterdir()) == ["weights_v000003"]


@pytest.mark.slow
def test_engines_node_restarts_its_killed_sglang_server_and_the_trainer_goes_on(toy, tmp_path):  # noqa: F811
    """The engines node's real sglang server SIGKILLed (its process group) once the sync to version 1 is on disk:
    `dapo-megatron engines` starts it again with the same command and catches it up from the newest synced folder;
    the trainer, whose requests or sync met the dead server, waits for it (rollout.engine_wait_s) and trains all 3
    steps on weights equal to its own."""
    shared, port, key = tmp_path / "shared_sync", free_port_block(), secrets.token_hex(16)
    placement = [*placement_of(shared, port), "rollout.health_interval_s=1"]
    env = node_envs(tmp_path, key)

    def args(node):
        return _args(toy, tmp_path / f"node{node}" / "run", steps=3, pp=2, extra=placement)

    log1, killed = tmp_path / "node1" / "engines.log", {}
    engines = start_engines_node(args(1), log1, tmp_path / "node1", env[1])

    def kill():
        try:
            killed["pids"] = kill_servers_after_sync(shared, 1, toy[0], tmp_path / "node0" / "run", timeout_s=900)
        except BaseException as e:  # noqa: BLE001 - reported by the test's thread
            killed["error"] = e

    try:
        _wait_for_line(engines, log1, "engine 0: ", 600)
        killer = threading.Thread(target=kill, daemon=True)
        killer.start()
        train_node0(args(0), env[0], tmp_path, log1, timeout=1200)
        killer.join(timeout=60)
        assert "error" not in killed and killed.get("pids"), killed
        assert served_version(port, key, "/model_info") == "3"  # the restarted server got every later sync
    finally:
        rc_engines = stop_engines_node(engines, 120)
    text = log1.read_text()
    assert rc_engines == 0 and "engines on node 1 stopped" in text, text[-3000:]
    assert text.count("restarting it") == 1, text[-3000:]  # `engines` restarted it, once
    assert servers_of(toy[0]) == [], "a real sglang server outlived its engines node"
    rows = [json.loads(x) for x in (tmp_path / "node0" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["rollout/train_infer_logprob_diff_max"] < 1e-4 and r["sync/gb"] > 0, r
