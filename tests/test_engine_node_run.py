"""A trainer node and an engines-only node on one host: node 1 runs only `dapo-megatron engines` (the embedded engine
behind its HTTP server, on the plan's port), node 0 runs the trainer (PP=2 under torchrun, 2 ranks), each with its
own TMPDIR and run folder. The trainer builds the engine's URL from the plan and $DAPO_NODE_HOSTS, waits for its
/health with the shared API key, generates on it and syncs weights to it by disk through the one folder the config
names (rollout.weight_sync_dir). After every sync (DAPO_CHECK_SYNC=1) the engine's weights equal the trainer's bit
for bit, compared by sha256 over HTTP; the engines process stops cleanly on SIGTERM at the end."""
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dapo_megatron.rollout.server import free_port
from tests.helpers.forked import run_cli
from tests.test_trainer import _args, toy  # noqa: F401 (toy is a fixture)

REPO = Path(__file__).resolve().parents[1]
TOY = str(REPO / "examples" / "toy" / "config.yaml")
pytestmark = [pytest.mark.dist, pytest.mark.timeout(1200)]


def _wait_for_line(proc, log: Path, text: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = log.read_text(errors="replace")
        if text in out:
            return out
        if proc.poll() is not None:
            pytest.fail(f"the engines process exited with {proc.returncode} before printing {text!r}:\n{out[-4000:]}")
        time.sleep(0.2)
    pytest.fail(f"no {text!r} from the engines process after {timeout_s:.0f} s:\n{log.read_text()[-4000:]}")


def node_envs(tmp_path, key: str, **extra) -> dict:
    """The environments of localhost "nodes" 0 and 1: a TMPDIR each, the run's API key, the two-node host list."""
    env = {}
    for node in (0, 1):
        (tmp_path / f"node{node}" / "tmp").mkdir(parents=True)
        env[node] = {**os.environ, "TMPDIR": str(tmp_path / f"node{node}" / "tmp"), "OMP_NUM_THREADS": "1",
                     "PYTHONPATH": str(REPO), "DAPO_ROLLOUT_API_KEY": key,
                     "DAPO_NODE_HOSTS": "127.0.0.1,127.0.0.1", "DAPO_ROLLOUT_HOST": "127.0.0.1", **extra}
    return env


def start_engines_node(args: list, log: Path, cwd: Path, env: dict) -> subprocess.Popen:
    """Node 1: `dapo-megatron engines` alone, 2 nodes of 2 ranks in the plan (the trainer's torchrun has 2 per node),
    in a process group of its own (stop_engines_node)."""
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "dapo_megatron.cli", "engines", "--config", TOY,
                                 "--nodes", "2", "--gpus-per-node", "2", "--node-rank", "1", *args],
                                stdout=f, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True)


def stop_engines_node(proc: subprocess.Popen, timeout_s: float) -> int:
    """SIGTERM, then its exit code; not stopped within `timeout_s`: its process group is killed and the test fails."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the engines process did not stop within {timeout_s:.0f} s of SIGTERM")


def train_node0(args: list, env: dict, tmp_path: Path, engines_log: Path, timeout: int = 900) -> str:
    """Node 0: `dapo-megatron train` (PP=2 under torchrun, 2 ranks); its output, once it exited 0 (else both logs)."""
    rc, out, _ = run_cli(["train", "--config", TOY, *args], env=env, cwd=tmp_path / "node0", timeout=timeout,
                         log=tmp_path / "node0" / "train.log")
    assert rc == 0, out[-6000:] + "\n---- engines\n" + engines_log.read_text()[-3000:]
    return out


def served_version(port: int, key: str, path: str = "/get_weight_version") -> str:
    """The weight version the engine at 127.0.0.1:`port` serves (embedded: /get_weight_version, SGLang: /model_info)."""
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return str(json.loads(r.read())["weight_version"])


@pytest.mark.slow
def test_trainer_node_and_engines_only_node(toy, tmp_path):  # noqa: F811
    shared, port, key = tmp_path / "shared_sync", free_port(), secrets.token_urlsafe(16)
    placement = ["rollout.colocate=false", "rollout.rollout_nodes=1", "rollout.weight_sync=disk",
                 f"rollout.weight_sync_dir={shared}", f"rollout.sglang_base_port={port}", "rollout.engine_wait_s=300",
                 "actor.recompute_old_logprobs=true"]
    env = node_envs(tmp_path, key, DAPO_CHECK_SYNC="1")

    def args(node):
        return _args(toy, tmp_path / f"node{node}" / "run", steps=3, pp=2, extra=placement)

    log1 = tmp_path / "node1" / "engines.log"
    engines = start_engines_node(args(1), log1, tmp_path / "node1", env[1])
    try:
        printed = _wait_for_line(engines, log1, "engine 0: ", 300)
        assert f"engine 0: http://127.0.0.1:{port} (node 1, backend embedded)" in printed and key not in printed
        out = train_node0(args(0), env[0], tmp_path, log1)
        assert served_version(port, key) == "3"  # the engines node serves the last sync
    finally:
        rc_engines = stop_engines_node(engines, 60)
    assert rc_engines == 0 and "engines on node 1 stopped" in log1.read_text(), log1.read_text()[-3000:]
    assert "engine-only node(s) 1: `dapo-megatron engines` starts theirs" in out  # start-up prints the plan
    assert key not in out and key not in log1.read_text()
    rows = [json.loads(x) for x in (tmp_path / "node0" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    from safetensors import safe_open

    with safe_open(str(toy[0] / "model.safetensors"), "pt") as f:
        n_tensors = len(list(f.keys()))
    for r in rows:  # the remote engine holds what both stages trained, every tensor, bit for bit
        assert r["debug/sync_mismatches"] == 0 and r["debug/sync_tensors_checked"] == n_tensors, r
        assert r["rollout/train_infer_logprob_diff_max"] < 1e-4 and r["sync/gb"] > 0
    assert sorted(p.name for p in shared.iterdir()) == ["weights_v000003"]  # the named folder, keep_last 1
    assert not (tmp_path / "node1" / "run").exists()  # the engines node writes no run folder
    outside = {p for p in tmp_path.rglob("*") if p.is_file() and not any(
        str(p).startswith(str(tmp_path / d)) for d in ("node0", "node1", "shared_sync"))}
    assert not outside, sorted(outside)[:5]


def test_engines_node_restarts_its_killed_engine_and_the_trainer_waits_and_goes_on(toy, tmp_path):  # noqa: F811
    """The engine-only node's engine is killed mid-rollout (DAPO_FAULT=engine_kill@2 on node 1: SIGKILL at the first
    generate of step 2, deterministic): `dapo-megatron engines` (rollout.backend=embedded_http, its engine in a
    process of its own) restarts it on the same port and catches it up from the newest synced folder; the trainer
    waits for it (rollout.engine_wait_s), generates the lost requests again and trains all 3 steps on the served
    weights."""
    shared, port, key = tmp_path / "shared_sync", free_port(), secrets.token_hex(16)
    placement = ["rollout.backend=embedded_http", "rollout.deterministic=false", "rollout.colocate=false",
                 "rollout.rollout_nodes=1", f"rollout.weight_sync_dir={shared}", f"rollout.sglang_base_port={port}",
                 "rollout.engine_wait_s=300", "rollout.health_interval_s=1", "actor.recompute_old_logprobs=true"]
    env = node_envs(tmp_path, key)
    env[1]["DAPO_FAULT"] = "engine_kill@2"  # the engines node's engine only; the trainer's environment has none

    def args(node):
        return _args(toy, tmp_path / f"node{node}" / "run", steps=3, pp=2, extra=placement)

    log1 = tmp_path / "node1" / "engines.log"
    engines = start_engines_node(args(1), log1, tmp_path / "node1", env[1])
    try:
        printed = _wait_for_line(engines, log1, "engine 0: ", 300)
        assert f"engine 0: http://127.0.0.1:{port} (node 1, backend embedded_http)" in printed
        out = train_node0(args(0), env[0], tmp_path, log1)
        assert served_version(port, key) == "3"  # the restarted engine got every later sync
    finally:
        rc_engines = stop_engines_node(engines, 60)
    text = log1.read_text()
    assert rc_engines == 0 and "engines on node 1 stopped" in text, text[-3000:]
    # the fault fired in the engine's own process (its log is its own); `engines` saw it die and restarted it, once
    assert text.count(f"engine 0 at http://127.0.0.1:{port} exited with code -9: restarting it") == 1, text[-3000:]
    # the trainer met the dead engine (the request it was serving) and went on: waited for it, or found it back
    assert f"generate on http://127.0.0.1:{port} failed" in out, out[-4000:]
    rows = [json.loads(x) for x in (tmp_path / "node0" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:  # step 2 was generated by the restarted engine, caught up to version 1
        assert r["rollout/train_infer_logprob_diff_max"] < 1e-4 and r["sync/gb"] > 0, r
    assert sorted(p.name for p in shared.iterdir()) == ["weights_v000003"]


def _children(pid: int) -> list:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(") ", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def test_engines_node_exits_2_in_one_line_when_its_supervisor_gives_up(toy, tmp_path):  # noqa: F811
    """`dapo-megatron engines` with rollout.backend=embedded_http and rollout.max_engine_restarts=0: its engine
    process SIGKILLed (by the test, by PID) is one death past the bound; the command stops its engines and exits 2
    with one line naming the engine and the fix, no traceback."""
    port, key = free_port(), secrets.token_hex(16)
    extra = ["rollout.backend=embedded_http", "rollout.deterministic=false", "rollout.colocate=false",
             "rollout.rollout_nodes=1", f"rollout.sglang_base_port={port}", "rollout.health_interval_s=0.5",
             "rollout.max_engine_restarts=0"]
    log = tmp_path / "node1" / "engines.log"
    engines = start_engines_node(_args(toy, tmp_path / "node1" / "run", steps=3, pp=2, extra=extra), log,
                                 tmp_path, node_envs(tmp_path, key)[1])
    try:
        _wait_for_line(engines, log, "engine 0: ", 300)
        server = [p for p in _children(engines.pid)
                  if f"--port\0{port}\0".encode() in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(server) == 1, (server, _children(engines.pid))
        os.kill(server[0], signal.SIGKILL)
        rc = engines.wait(timeout=120)  # the watch notices within 0.5 s, the command checks every 5 s
    finally:
        stop_engines_node(engines, 60)
    text = log.read_text()
    lines = [x for x in text.splitlines() if x.startswith("dapo-megatron engines: ")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in text, text[-3000:]
    assert f"engine 0 at http://127.0.0.1:{port} exited with code -9, past 0 restart(s)" in lines[0], lines
    assert "then resume from the last checkpoint" in lines[0]
