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
from tests.test_trainer import _args

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.dist, pytest.mark.slow, pytest.mark.timeout(1200)]


def _two_nodes(tmp_path, node_args, timeout=900, extra_env=None):
    """Start node 0 and node 1 (one process each) and wait for both; returns their logs."""
    port, procs = free_port(), []
    for node in (0, 1):
        folder = tmp_path / f"node{node}"
        (folder / "tmp").mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "TMPDIR": str(folder / "tmp"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
               **(extra_env or {})}
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


@pytest.fixture(scope="module")
def wide_toy(tmp_path_factory):
    """A toy big enough that a stage (~60 MB) dwarfs a bucket and the interpreter's noise."""
    from dapo_megatron.models.tiny import make_tiny_hf_model

    root = tmp_path_factory.mktemp("toy")
    hf = make_tiny_hf_model(root / "hf", "qwen2.5", seed=1, hidden_size=512, intermediate_size=2048,
                            num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"question": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                            for a in range(5) for b in range(5)))
    return hf, data


BUCKET_MB = 4


def test_three_dapo_steps_pp2_across_two_nodes(wide_toy, tmp_path):
    """Each node's local rank 0 runs an embedded engine (HTTP, on that node's address); rank 0's client uses both.
    After every sync (checked inside the run, DAPO_CHECK_SYNC=1) both engines hold the trainer's weights bit for
    bit, and no rank's memory grew by more than one bucket and one tensor (never a stage, never the model)."""
    save = tmp_path / "shared_ckpt"  # trainer.save: the one folder the config names for both nodes
    before = set(Path("/tmp").glob("dapo_sync_*"))

    def args(node):
        run = tmp_path / f"node{node}" / "run"
        return ["-m", "dapo_megatron.cli", "train", *_args(wide_toy, run, steps=3, pp=2),
                f"trainer.save={save}", f"rollout.weight_sync_bucket_mb={BUCKET_MB}"]

    # Two "nodes" on one host: each names its own (loopback) address, as a node of a cluster names its own.
    logs = _two_nodes(tmp_path, args, extra_env={"DAPO_CHECK_SYNC": "1", "DAPO_ROLLOUT_HOST": "127.0.0.1"})
    rows = [json.loads(x) for x in (tmp_path / "node0" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert "engines: 2 embedded engines, one per node" in logs[0]
    from safetensors import safe_open

    with safe_open(str(wide_toy[0] / "model.safetensors"), "pt") as f:
        n_tensors = len(list(f.keys()))  # every HF tensor of the model, on each of the two engines
    summary = []
    for r in rows:  # both engines (node 0 and node 1) serve what both stages trained
        assert r["rollout/train_infer_logprob_diff_max"] < 1e-4 and r["sync/gb"] > 0
        assert r["debug/sync_mismatches"] == 0 and r["debug/sync_tensors_checked"] == 2 * n_tensors, r
        largest = r["debug/sync_largest_tensor_mb"]
        for rank in (0, 1):
            grow, stage = r[f"debug/sync_rss_growth_mb/rank{rank}"], r[f"debug/stage_mb/rank{rank}"]
            summary.append((r["step"], rank, round(grow, 1), round(stage, 1)))
            # one bucket + the largest tensor twice (gathered and split, and its copy in the bucket) + 24 MB for the
            # interpreter and allocator; a copy of the stage (60 MB), let alone the model, would not fit
            assert grow < BUCKET_MB + 2 * largest + 24 < stage, (rank, grow, stage, largest)
    print("peak RSS growth during sync (step, rank, MB, stage MB):", summary)
    assert (save / "latest").read_text().strip() == "iter_0000003"
    assert "plan: 2 node(s) x 1 GPU(s)" in logs[0]  # start-up prints the plan
    assert not (tmp_path / "node1" / "run").exists()  # node 1's ranks (and its engine) write nothing to a run folder
    outside = {p for p in _files(tmp_path) if not any(
        str(p).startswith(str(tmp_path / d)) for d in ("node0", "node1", "shared_ckpt"))}
    assert not outside, sorted(outside)[:5]
    assert set(Path("/tmp").glob("dapo_sync_*")) == before  # the old hand-off folder is gone
