"""End to end through the CLI (world size 1, tiny model, deterministic rollout): the checkpoint path loses nothing.

One uninterrupted reference run (4 steps, a checkpoint every step) is shared by every test here: rollback with
keep_last, a damaged newest checkpoint, a full disk, and kills at seeded moments (mid-step, mid-save, mid-log).
"""
import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from dapo_megatron.models import ckpt_layout as layout

from dapo_megatron.models.tiny import make_tiny_hf_model
from test_trainer import _args, _metrics
from tests.helpers.forked import run_cli

REPO = Path(__file__).resolve().parents[1]
READ = REPO / "tests" / "dist_scripts" / "read_checkpoints.py"
STEPS = 4
POINTS = ["log", "save_model", "save_manifest", "save_latest", "train"]  # seed i kills at POINTS[i]


def train(toy, run_dir, steps=STEPS, extra=(), env=None):
    """(rc, output) of `dapo-megatron train` on the toy setup, a checkpoint every step: a process of its own, forked
    from a warm one (tests/helpers/forked.py), its output in a file (after a SIGKILL the verifier pool's orphans
    would hold pipes), and whatever it leaves behind killed with its process group."""
    args = _args(toy, run_dir, steps, extra=["trainer.save_interval=1", *extra])
    log = Path(run_dir).parent / f"{Path(run_dir).name}.{len(list(Path(run_dir).parent.glob('*.log')))}.log"
    rc, text, _ = run_cli(["train", *args], env=env, timeout=600, log=log)
    return rc, text


def ok(result):
    rc, text = result
    assert rc == 0, text[-6000:]
    assert "Traceback" not in text
    return text


def weights(torchrun, tmp_path, *ckpt_dirs):
    outs = [tmp_path / f"w{i}.pt" for i in range(len(ckpt_dirs))]
    torchrun(READ, 1, *[x for d, o in zip(ckpt_dirs, outs) for x in (Path(d) / "model", o)])
    return [torch.load(o) for o in outs]


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def rows(run_dir):
    return [{k: v for k, v in r.items() if k != "time"} for r in _metrics(run_dir)]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):  # the same tiny model and data as tests/test_trainer.py
    root = tmp_path_factory.mktemp("toy")
    hf = make_tiny_hf_model(root / "hf", "qwen2.5", seed=1)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"question": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                            for a in range(5) for b in range(5)))
    return hf, data


@pytest.fixture(scope="module")
def reference(toy, tmp_path_factory):
    run = tmp_path_factory.mktemp("reference") / "run"
    ok(train(toy, run))
    return run


def copy_run(reference, dst):
    shutil.copytree(reference, dst)
    return dst, dst / "checkpoints"


@pytest.mark.dist
def test_rollback_with_keep_last_keeps_the_live_checkpoint(toy, reference, tmp_path):
    """Data loss 1: resume from an older iter_* with keep_last: newer ones move aside, pruning follows the lineage."""
    run, ck = copy_run(reference, tmp_path / "run")
    old = {p.name: (p / "manifest.json").read_text() for p in layout.iteration_dirs(ck)}
    text = ok(train(toy, run, extra=[f"trainer.load={ck / 'iter_0000002'}", "trainer.keep_last=2"]))
    aside = [p for p in ck.iterdir() if p.name.startswith("abandoned_")]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["iter_0000003", "iter_0000004"]
    assert {p.name: (p / "manifest.json").read_text() for p in aside[0].iterdir()} == {
        k: old[k] for k in ("iter_0000003", "iter_0000004")}  # moved, not rewritten
    assert sum("moved iter_0000003, iter_0000004 aside" in line for line in text.splitlines()) == 1
    assert (ck / "latest").read_text().strip() == "iter_0000004"
    assert sorted(p.name for p in layout.iteration_dirs(ck)) == ["iter_0000003", "iter_0000004"]  # 1, 2 pruned
    assert rows(run) == rows(reference)  # the replayed steps reproduce the abandoned ones (deterministic mode)
    replaced = (run / "metrics_replaced.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in replaced] == [3, 4]  # the old records of the replayed steps are kept
    ok(train(toy, run, steps=STEPS + 1, extra=[f"trainer.load={ck}", "trainer.keep_last=2"]))  # next resume works
    assert (ck / "latest").read_text().strip() == "iter_0000005"


@pytest.mark.dist
def test_missing_trainer_state_falls_back_and_rewrites_nothing(toy, reference, tmp_path):
    """Data loss 2: a newest checkpoint without trainer_state.json used to restart at step 1 and overwrite iter_1..."""
    run, ck = copy_run(reference, tmp_path / "run")
    (ck / "iter_0000004" / "trainer_state.json").unlink()
    untouched = {n: (ck / n / "manifest.json").read_text() for n in ("iter_0000001", "iter_0000002", "iter_0000003")}
    text = ok(train(toy, run, extra=[f"trainer.load={ck}"]))
    lines = [x for x in text.splitlines() if "unusable" in x]
    assert len(lines) == 1 and "iter_0000004" in lines[0] and "resuming from iter_0000003" in lines[0], lines
    assert "trainer_state.json is missing" in lines[0]
    assert {n: (ck / n / "manifest.json").read_text() for n in untouched} == untouched
    aside = [p for p in ck.iterdir() if p.name.startswith("abandoned_")]
    assert len(aside) == 1 and not (aside[0] / "iter_0000004" / "trainer_state.json").exists()  # kept as found
    assert rows(run) == rows(reference)


@pytest.mark.dist
def test_disk_full_during_save_is_one_line_and_leaves_no_tmp(toy, reference, tmp_path):
    """A small tmpfs as trainer.save (the real ENOSPC); the fault hook where mounting is not permitted."""
    save = tmp_path / "small"
    save.mkdir()
    size = sum(f.stat().st_size for f in (reference / "checkpoints" / "iter_0000001").rglob("*") if f.is_file())
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.5)}", "tmpfs", str(save)],
                             capture_output=True).returncode == 0
    if not mounted:
        print(f"tmpfs not permitted here: disk full simulated with DAPO_FAULT=enospc:save_model@2 in {save}")
    try:
        rc, text = train(toy, tmp_path / "run", extra=[f"trainer.save={save}"],
                         env=None if mounted else {"DAPO_FAULT": "enospc:save_model@2"})
        assert rc == 2 and "Traceback" not in text, text[-6000:]
        errors = [x for x in text.splitlines() if x.startswith("dapo-megatron train:")]
        assert len(errors) == 1, text[-3000:]
        assert "saving checkpoint iter_0000002" in errors[0] and "the disk is full" in errors[0]
        assert "the previous checkpoint iter_0000001 is intact" in errors[0]
        assert sorted(p.name for p in save.iterdir() if p.name != "hf_config") == ["iter_0000001", "latest"]
        assert layout.resolve(save)[0].name == "iter_0000001"  # what a later resume picks: the intact one
    finally:
        if mounted:
            subprocess.run(["umount", str(save)], check=True)


def kill_plan(seed: int) -> tuple[str, int]:
    """(point, step): seeds 0-4 kill at log@3, save_model@3, save_manifest@4 (the last step), save_latest@3, train@2.
    Step 1 is never drawn: a run killed before its first checkpoint has nothing to resume."""
    return POINTS[seed], random.Random(str(seed)).randint(2, STEPS)


def whole_rows(run_dir) -> int:
    """The metrics.jsonl lines a resume would keep (a torn last line is not one)."""
    return (Path(run_dir) / "metrics.jsonl").read_bytes().count(b"\n")


def _kill_and_resume(toy, reference, tmp_path, torchrun, seed):
    point, step = kill_plan(seed)
    run = tmp_path / "run"
    rc, text = train(toy, run, env={"DAPO_FAULT": f"{point}@{step}"})
    assert rc == -9, (point, step, text[-3000:])  # SIGKILLed where planned
    # where planned: a kill mid-step or mid-log leaves step-1 whole lines; a kill mid-save comes after its step's log
    assert whole_rows(run) == step - (point in ("train", "log")), (point, step)
    ck = run / "checkpoints"
    assert layout.read_latest(ck) == layout.iter_name(step - 1), (point, step)  # `latest` is never ahead of a kill
    ok(train(toy, run, extra=[f"trainer.load={ck}"]))
    want = rows(reference)  # real numbers: one row per step, with a loss that moves from step to step
    assert [r["step"] for r in want] == list(range(1, STEPS + 1)) and len(set(r["actor/pg_loss"] for r in want)) > 1
    assert rows(run) == want, (point, step)  # every step once, same numbers
    assert (ck / "latest").read_text().strip() == layout.iter_name(STEPS) and not list(ck.glob("*.tmp"))
    final = layout.iter_name(STEPS)
    a, b, before = weights(torchrun, tmp_path, reference / "checkpoints" / final, ck / final,
                           reference / "checkpoints" / layout.iter_name(STEPS - 1))
    assert a and not same_weights(a, before)  # the last step moved the weights: equality below means something
    assert same_weights(a, b), (point, step)
    manifest = layout.read_manifest(ck / final)  # and the trainer records the padded vocabulary it saved
    assert manifest["vocab"] == {"padded_vocab_size": 128, "tensor_model_parallel_size": 1,
                                 "make_vocab_size_divisible_by": None}


@pytest.mark.dist
def test_kill_mid_log_then_resume_is_exact(toy, reference, tmp_path, torchrun):
    _kill_and_resume(toy, reference, tmp_path, torchrun, seed=0)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("seed", range(5))
def test_kill_at_seeded_moments_then_resume_is_exact(toy, reference, tmp_path, torchrun, seed):
    _kill_and_resume(toy, reference, tmp_path, torchrun, seed)
