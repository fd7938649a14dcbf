"""Every shipped recipe plans on the cluster its header names (`# cluster: N nodes x G GPUs, 80 GB`): placement and
memory fit. The recipes' models are not on disk: plan reads the config.json each recipe ships (hf_config.json)."""
import json
import re
from pathlib import Path

import pytest

from dapo_megatron.cli import run_command

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.relative_to(REPO) for p in (REPO / "examples").glob("*/*.yaml")
                 if p.name != "configs.yaml")  # ablation/configs.yaml holds overrides of base.yaml, not a config
HEADER = re.compile(r"^# cluster: (\d+) nodes? x (\d+) GPUs?, (\d+) GB$")


def cluster(recipe: Path) -> tuple:
    first = (REPO / recipe).read_text().splitlines()[0]
    found = HEADER.match(first)
    assert found, f"{recipe}: first line must be `# cluster: N nodes x G GPUs, 80 GB`, got {first!r}"
    return tuple(int(x) for x in found.groups())


def plan(capsys, *args) -> tuple:
    rc = run_command("plan", [str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_every_recipe_is_covered():
    names = {p.parent.name for p in RECIPES}
    assert {"dapo_qwen2.5_32b", "dapo_qwen2.5_7b", "dapo_qwen3_30b_a3b", "gspo_qwen2.5_7b", "toy",
            "ablation"} <= names, names


@pytest.mark.parametrize("recipe", RECIPES, ids=str)
def test_recipe_plans_and_fits_on_its_cluster(recipe, capsys):
    nodes, gpus, gb = cluster(recipe)
    rc, out, err = plan(capsys, "--config", REPO / recipe, "--nodes", nodes, "--gpus-per-node", gpus,
                        "--gpu-memory-gib", gb, "--json")
    assert rc == 0, err
    result = json.loads(out)
    memory = result["memory"]
    assert memory is not None and memory["fits"] and memory["gpu_gib"] == gb, memory
    assert len(memory["stages"]) == result["pp"]
    for st in memory["stages"]:
        parts = ("weights_gib", "grads_gib", "optimizer_gib", "activations_gib", "logits_gib", "engine_gib")
        assert all(st[k] >= 0 for k in parts) and 0 < st["total_gib"] <= gb, st


def test_32b_recipe_as_it_was_is_refused_in_one_line(capsys):
    # the recipe before #26: TP 8 x PP 2, no sequence parallelism, no recompute
    rc, out, err = plan(capsys, "--config", REPO / "examples/dapo_qwen2.5_32b/config.yaml", "--nodes", 4,
                        "--gpus-per-node", 8, "parallel.sequence_parallel=false")
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("dapo-megatron plan: memory error: stage 0 needs 123.4 GiB per GPU, over 80 GiB; "
                               "largest term: activations 89.1 GiB; fits with any of: parallel.sequence_parallel=true")
    assert "stage 0: 123.4 GiB" in out  # the placement and the per-stage terms are still printed


def test_gpu_memory_and_overrides_change_the_verdict(capsys):
    r7 = REPO / "examples/dapo_qwen2.5_7b/config.yaml"
    rc, out, _ = plan(capsys, "--config", r7, "--nodes", 1, "--gpus-per-node", 8, "--json")
    base = json.loads(out)["memory"]["stages"][0]
    rc, out, err = plan(capsys, "--config", r7, "--nodes", 1, "--gpus-per-node", 8, "--gpu-memory-gib", 30)
    assert rc == 2 and "dapo-megatron plan: memory error: stage 0" in err
    rc, out, _ = plan(capsys, "--config", r7, "--nodes", 1, "--gpus-per-node", 8, "--json",
                      "actor.recompute_granularity=full", "actor.recompute_method=uniform",
                      "actor.recompute_num_layers=1")
    full = json.loads(out)["memory"]["stages"][0]
    assert rc == 0 and full["activations_gib"] < base["activations_gib"] / 5


def test_plan_without_a_model_config_still_places(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  path: /nowhere/model\n")
    rc, out, err = plan(capsys, "--config", cfg, "--nodes", 1, "--gpus-per-node", 1)
    assert rc == 0 and "memory: not estimated: no config.json at model.path=/nowhere/model" in out
    rc, out, err = plan(capsys, "--config", cfg, "--nodes", 1, "--gpus-per-node", 1, "--json",
                        "--model-config", REPO / "examples/toy/hf_config.json")
    assert rc == 0 and json.loads(out)["memory"]["fits"]
    rc, out, err = plan(capsys, "--config", cfg, "--nodes", 1, "--gpus-per-node", 1, "--model-config", tmp_path / "no")
    assert rc == 2 and err.startswith(f"dapo-megatron plan: placement error: --model-config {tmp_path / 'no'}: no such")


def test_readme_table_matches_the_plans(capsys):
    readme = (REPO / "README.md").read_text()
    for recipe in RECIPES:
        nodes, gpus, gb = cluster(recipe)
        rc, out, _ = plan(capsys, "--config", REPO / recipe, "--nodes", nodes, "--gpus-per-node", gpus, "--json")
        totals = " / ".join(f"{s['total_gib']:.1f}" if s["total_gib"] >= 1 else f"{s['total_gib']:.3f}"
                            for s in json.loads(out)["memory"]["stages"])
        row = next((line for line in readme.splitlines() if line.startswith(f"| `{recipe}`")), None)
        assert row is not None and f"| {totals} |" in row, (recipe, totals, row)


def test_fixes_are_settings_that_the_config_accepts(capsys):
    # the 30B-A3B recipe as it was (TP 2 x PP 1): R3 routing replay rules out full recompute, so only more PP is named
    rc, out, err = plan(capsys, "--config", REPO / "examples/dapo_qwen3_30b_a3b/config.yaml", "--nodes", 2,
                        "--gpus-per-node", 8, "parallel.tensor_model_parallel_size=2",
                        "parallel.pipeline_model_parallel_size=1")
    assert rc == 2 and "largest term: activations" in err and "recompute_granularity" not in err, err
    assert "fits with any of" not in err or "parallel.pipeline_model_parallel_size=2" in err
