"""`dapo-megatron plan`: the shipped recipes plan cleanly; impossible placements get one-line refusals."""
import subprocess
from pathlib import Path

import pytest

from dapo_megatron.config import build_config
from dapo_megatron.placement import PlacementError, make_plan
from tests.helpers.forked import run_cli

REPO = Path(__file__).resolve().parents[1]
R32, R7 = "examples/dapo_qwen2.5_32b/config.yaml", "examples/dapo_qwen2.5_7b/config.yaml"


def plan_cli(*args):
    rc, out, err = run_cli(["plan", *args], timeout=120)
    return subprocess.CompletedProcess(["dapo-megatron", "plan", *args], rc, out, err)


def test_paper_recipe_on_4x8_is_disaggregated_with_a_group_per_stage():
    plan = make_plan(build_config(str(REPO / R32)), 4, 8)
    assert plan.kind == "disaggregated" and (plan.tp, plan.pp, plan.dp) == (8, 2, 1) and plan.trainer_nodes == [0, 1]
    assert [(e.node, e.gpus, e.port) for e in plan.engines] == [
        (2, [0, 1, 2, 3], 30000), (2, [4, 5, 6, 7], 30010), (3, [0, 1, 2, 3], 30000), (3, [4, 5, 6, 7], 30010)]
    assert plan.sync_mode == "distributed" and plan.stage_sources() == [0, 8]
    out = plan_cli("--config", R32, "--nodes", "4", "--gpus-per-node", "8")
    assert out.returncode == 0 and "sync group dapo_weight_sync_pp1: trainer rank 8 (stage 1)" in out.stdout


def test_7b_recipe_on_1x8_is_colocated():
    plan = make_plan(build_config(str(REPO / R7)), 1, 8)
    assert plan.kind == "colocated" and (plan.tp, plan.pp, plan.dp) == (4, 1, 2)
    assert [e.gpus for e in plan.engines] == [[0, 1], [2, 3], [4, 5], [6, 7]] and plan.sync_mode == "disk"
    assert plan_cli("--config", R7, "--nodes", "1", "--gpus-per-node", "8").returncode == 0


def test_toy_and_external_plan():
    toy = make_plan(build_config(str(REPO / "examples/toy/config.yaml")), 1, 1)
    assert toy.kind == "colocated" and toy.sync_mode == "tensor" and len(toy.engines) == 1
    ext = make_plan(build_config(None, ["rollout.backend=http", "rollout.urls=[http://a:1,http://b:2]",
                                        "rollout.weight_sync=disk"]), 2, 8)
    assert ext.kind == "external" and ext.urls == ["http://a:1", "http://b:2"] and ext.dp == 16


@pytest.mark.parametrize("config, overrides, nodes, gpus, message", [
    (R32, [], 2, 8, "rollout.rollout_nodes=2 leaves no node for the trainer"),  # more GPUs than exist
    (R32, ["rollout.sglang_num_servers=8"], 4, 8, "needs 32 GPUs, more than the 16"),
    (R7, ["parallel.tensor_model_parallel_size=3"], 1, 8, "tensor_model_parallel_size=3 must divide the 8 GPUs"),
    (R7, ["rollout.sglang_tp_size=3"], 1, 8, "sglang_tp_size=3 must divide the 8 GPUs"),
    (R7, ["rollout.colocate=false"], 1, 8, "they would overlap the trainer"),
    (R7, ["rollout.weight_sync=distributed"], 1, 8, "one GPU in one NCCL group"),
])
def test_impossible_placements_are_refused_in_one_line(config, overrides, nodes, gpus, message):
    with pytest.raises(PlacementError, match=message.replace("(", r"\(")):
        make_plan(build_config(str(REPO / config), overrides), nodes, gpus)
    out = plan_cli("--config", config, "--nodes", str(nodes), "--gpus-per-node", str(gpus), *overrides)
    assert out.returncode != 0 and out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1 and message in out.stderr and "Traceback" not in out.stderr
