"""Two nodes on one host: `torchrun --nnodes 2 --node_rank 0|1`, static rendezvous on 127.0.0.1, each node with its own
TMPDIR and run folder, PP=2 across the nodes. Weight sync streams each stage's buckets over torch.distributed: the
engine's weights equal the trainer's bit for bit after every sync, no rank holds a copy of its stage, and nothing is
written outside each node's folders (and the folders the config names)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dapo_megatron.rollout.server import free_port
from tests.test_trainer import _args, toy  # noqa: F401 (toy is a fixture)

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.dist, pytest.mark.slow, pytest.mark.timeout(1200)]


def _two_nodes(tmp_path, node_args, timeout=900):
    """Start node 0 and node 1 (one process each) and wait for both; returns their logs."""
    port, procs = free_port(), []
    for node in (0, 1):
        folder = tmp_path / f"node{node}"
        (folder / "tmp").mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "TMPDIR": str(folder / "tmp"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        log = open(folder / "log.txt", "w")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port), *node_args(node)]
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=folder, env=env), log))
    rcs = []
    for proc, log in procs:
        try:
            rcs.append(proc.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            for p, _ in procs:
                p.kill()
            pytest.fail(f"two-node run did not finish in {timeout} s")
        log.close()
    logs = [(tmp_path / f"node{n}" / "log.txt").read_text() for n in (0, 1)]
    if any(rcs):
        pytest.fail(f"two-node run failed {rcs}:\n{logs[0][-4000:]}\n---- node 1\n{logs[1][-4000:]}")
    return logs


def _files(root: Path) -> set:
    return {p for p in root.rglob("*") if p.is_file()}


def test_pp2_across_two_nodes_weight_sync_is_bit_exact_and_bounded(tmp_path):
    shared = tmp_path / "shared"  # named on the command line (the model folder), as a config would name it
    out = tmp_path / "node0" / "bench.json"
    _two_nodes(tmp_path, lambda node: [str(REPO / "tools" / "bench_weight_sync.py"), "--mode", "stream",
                                       "--hidden", "512", "--layers", "4", "--vocab", "16384", "--bucket-mb", "8",
                                       "--syncs", "3", "--workdir", str(shared)]
               + (["--out", str(out)] if node == 0 else []))
    res = json.loads(out.read_text())
    assert res["bit_exact"] is True  # checked after each of the 3 syncs, every tensor, torch.equal
    largest_mb = 16384 * 512 * 4 / 2 ** 20  # the embedding / output layer: one tensor larger than a bucket
    for rank, (grow, stage) in enumerate(zip(res["peak_rss_growth_mb"], res["stage_params_mb"])):
        # one bucket (or the one tensor bigger than a bucket) plus slack; never a copy of the stage or the model
        assert grow < max(res["bucket_mb"], largest_mb) + 16 < stage + res["bucket_mb"], (rank, res)
    for node in (0, 1):
        assert not list((tmp_path / f"node{node}" / "tmp").glob("dapo_sync_*"))


def test_three_dapo_steps_pp2_across_two_nodes(toy, tmp_path):  # noqa: F811
    save = tmp_path / "shared_ckpt"  # trainer.save: the one folder the config names for both nodes
    before = set(Path("/tmp").glob("dapo_sync_*"))

    def args(node):
        run = tmp_path / f"node{node}" / "run"
        return ["-m", "dapo_megatron.cli", "train", *_args(toy, run, steps=3, pp=2),
                f"trainer.save={save}", "rollout.weight_sync_bucket_mb=0.05"]

    logs = _two_nodes(tmp_path, args)
    rows = [json.loads(x) for x in (tmp_path / "node0" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:  # the engine (rank 0, node 0) serves what both stages trained: log-probs agree
        assert r["rollout/train_infer_logprob_diff_max"] < 1e-4 and r["sync/gb"] > 0
    assert (save / "latest").read_text().strip() == "iter_0000003"
    assert "plan: 2 node(s) x 1 GPU(s)" in logs[0]  # start-up prints the plan
    assert not (tmp_path / "node1" / "run").exists()  # node 1's ranks write nothing to a run folder
    outside = {p for p in _files(tmp_path) if not any(
        str(p).startswith(str(tmp_path / d)) for d in ("node0", "node1", "shared_ckpt", "toy"))}
    assert not outside, sorted(outside)[:5]
    assert set(Path("/tmp").glob("dapo_sync_*")) == before  # the old hand-off folder is gone
