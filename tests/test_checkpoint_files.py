"""Checkpoint folder rules that need no process group (models/ckpt_layout.py): manifest, damage, fallback, lineage."""
import json
import re

import pytest

from dapo_megatron.models.hf_config import padded_vocab_size
from dapo_megatron.models import ckpt_layout as layout
from dapo_megatron.models.ckpt_layout import CheckpointDamaged, CheckpointError


def make_ckpt(root, n, parent=None, kind="train", arch=None):
    """A checkpoint folder with every part its kind needs (dummy bytes), sealed by its manifest."""
    d = root / layout.iter_name(n)
    (d / "model").mkdir(parents=True)
    (d / "model" / "__0_0.distcp").write_bytes(b"m" * (2 << 20))  # > 1 MiB: checked by size only
    (d / "model" / "metadata.json").write_text("{}")
    if kind == "train":
        (d / "optim").mkdir()
        (d / "optim" / "__0_0.distcp").write_bytes(b"o" * 100)
        (d / "rng").mkdir()
        (d / "rng" / "rank0.pt").write_bytes(b"r")
        (d / "trainer_state.json").write_text(json.dumps({"iteration": n}))
    layout.write_manifest(d, kind, n, parent=parent, arch=arch)
    return d


def timeline(root, steps, start=1, parent=None):
    for n in range(start, start + steps):
        parent = make_ckpt(root, n, parent).name
        layout.write_latest(root, parent)


def test_manifest_seals_and_verifies(tmp_path):
    d = make_ckpt(tmp_path, 3)
    m = layout.read_manifest(d)
    assert m["kind"] == "train" and m["iteration"] == 3 and "sha256" in m["files"]["trainer_state.json"]
    assert "sha256" not in m["files"]["model/__0_0.distcp"] and m["files"]["model/__0_0.distcp"]["size"] == 2 << 20
    assert not [p for p in d.iterdir() if ".tmp" in p.name]
    with pytest.raises(CheckpointDamaged, match="without optim"):  # cannot seal an incomplete folder
        (tmp_path / "x" / "model").mkdir(parents=True)
        layout.write_manifest(tmp_path / "x", "train", 1)


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "model" / "__0_0.distcp").write_bytes(b"m" * 100), r"model/__0_0.distcp has 100 bytes"),
    (lambda d: (d / "trainer_state.json").unlink(), r"trainer_state.json is missing"),
    (lambda d: __import__("shutil").rmtree(d / "optim"), r"optim/__0_0.distcp is missing"),
    (lambda d: (d / "trainer_state.json").write_text(json.dumps({"iteration": 9})), r"does not match its checksum"),
    (lambda d: (d / "manifest.json").unlink(), r"incomplete: no manifest.json"),
    (lambda d: (d / "manifest.json").write_bytes(b"\xff\xfe garbage"), r"manifest.json is unreadable"),
], ids=["truncated_shard", "no_trainer_state", "no_optim", "edited_state", "no_manifest", "garbage_manifest"])
def test_damaged_newest_falls_back_in_one_line_and_a_pinned_one_is_refused(tmp_path, damage, message):
    timeline(tmp_path, 3)
    damage(tmp_path / "iter_0000003")
    lines = []
    path, manifest = layout.resolve(tmp_path, log=lines.append)
    assert path == tmp_path / "iter_0000002" and manifest["iteration"] == 2
    assert len(lines) == 1 and "iter_0000003" in lines[0] and "iter_0000002" in lines[0], lines
    assert __import__("re").search(message, lines[0]), lines[0]
    with pytest.raises(CheckpointDamaged, match=message) as e:
        layout.resolve(tmp_path / "iter_0000003")
    assert "\n" not in str(e.value) and "trainer.load=" in str(e.value)


def test_garbage_latest_is_reported_and_not_trusted(tmp_path):
    timeline(tmp_path, 2)
    (tmp_path / "latest").write_bytes(b"\x89PNG\xff\xfe")
    lines = []
    assert layout.resolve(tmp_path, log=lines.append)[0] == tmp_path / "iter_0000002"
    assert len(lines) == 1 and "latest is unreadable" in lines[0]
    (tmp_path / "latest").write_text("../../etc\n")
    assert layout.read_latest(tmp_path) is None


def test_no_complete_checkpoint_and_unsealed_tmp(tmp_path):
    with pytest.raises(CheckpointError, match="holds no iter_"):
        layout.resolve(tmp_path)
    (tmp_path / "iter_0000004.tmp" / "model").mkdir(parents=True)  # a save killed half way: never picked
    (tmp_path / "iter_0000002" / "model").mkdir(parents=True)  # renamed but never sealed (older layout)
    with pytest.raises(CheckpointError, match="no complete checkpoint: iter_0000002 is incomplete"):
        layout.resolve(tmp_path)


def test_rollback_moves_newer_aside_and_prune_follows_the_lineage(tmp_path):
    """The issue's repro: 7 saves, resume from iter_3 with keep_last=2, 2 more saves: the live ones survive."""
    timeline(tmp_path, 7)
    lines = []
    path, manifest = layout.resolve(tmp_path / "iter_0000003")
    layout.claim_for_resume(tmp_path, path, manifest, log=lines.append)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("abandoned_")]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == [
        f"iter_{n:07d}" for n in range(4, 8)]
    assert len(lines) == 1 and "iter_0000004, iter_0000005, iter_0000006, iter_0000007" in lines[0]
    assert layout.read_latest(tmp_path) == "iter_0000003"
    for n in (4, 5):  # what save_checkpoint does: seal with parent = latest, rename, latest, prune
        make_ckpt(tmp_path, n, parent=layout.read_latest(tmp_path))
        layout.write_latest(tmp_path, layout.iter_name(n))
        layout.prune(tmp_path, keep_last=2)
    assert layout.read_latest(tmp_path) == "iter_0000005"
    assert sorted(p.name for p in layout.iteration_dirs(tmp_path)) == ["iter_0000004", "iter_0000005"]
    assert len(list(aside[0].iterdir())) == 4  # the abandoned timeline is kept, not pruned
    assert layout.resolve(tmp_path)[0].name == "iter_0000005"  # the next resume works


def test_prune_never_deletes_off_lineage_or_model_only_folders(tmp_path):
    make_ckpt(tmp_path, 0, kind="model")
    timeline(tmp_path, 3, parent="iter_0000000")
    make_ckpt(tmp_path, 9)  # not an ancestor of `latest` (someone else's): untouched
    removed = layout.prune(tmp_path, keep_last=1)
    assert sorted(p.name for p in removed) == ["iter_0000001", "iter_0000002"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["iter_0000000", "iter_0000003",
                                                                         "iter_0000009"]


def test_model_only_kind_is_told_apart_by_its_manifest(tmp_path):
    d = make_ckpt(tmp_path, 0, kind="model")
    assert layout.read_manifest(d)["kind"] == "model"  # no optim/, trainer_state.json or rng/ needed
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["kind"] = "train"  # a train checkpoint that lost its optimizer and trainer state: refused
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointDamaged, match="its manifest lists no optim"):
        layout.read_manifest(d)


def test_architecture_mismatch_is_one_line(tmp_path):
    from dapo_megatron.models.tiny import make_tiny_hf_model

    hf = make_tiny_hf_model(tmp_path / "hf", "qwen2.5", seed=1)
    arch = layout.arch_summary(hf)
    d = make_ckpt(tmp_path / "ck", 1, arch={**arch, "hidden_size": arch["hidden_size"] * 2})
    with pytest.raises(CheckpointError, match=rf"hidden_size={arch['hidden_size'] * 2} but model.path=.* has "
                                              rf"hidden_size={arch['hidden_size']}; set model.path"):
        layout.check_compatible(layout.read_manifest(d), d, hf)
    layout.check_compatible({"arch": arch}, d, hf)  # same architecture: accepted


def test_padded_vocab_mismatch_names_the_keys_and_the_fix(tmp_path):
    """Qwen's 151936 rows: padded 151936 at TP=1 and 152064 at TP=2 (divisor 128); old manifests are not checked."""
    saved = layout.vocab_record(151936, tp=1, divisor=128)
    assert layout.vocab_mismatch(saved, 151936, 128, tp=1) is None
    assert layout.vocab_mismatch(saved, 151936, 64, tp=2) is None  # 151936 = 64 x 2 x 1187: same rows, loads
    why = layout.vocab_mismatch(saved, 151936, 128, tp=2)
    assert why == ("has its vocabulary padded to 151936 rows (TP=1, make_vocab_size_divisible_by=128) but this run "
                   "pads vocab_size=151936 to 152064 (parallel.tensor_model_parallel_size=2, model.make_vocab_size_"
                   "divisible_by=128); resume at parallel.tensor_model_parallel_size=1, or set model.make_vocab_size_"
                   "divisible_by=64 so the padded sizes agree, or convert it through HF (convert megatron-to-hf, "
                   "then hf-to-megatron --tensor-model-parallel-size 2: weights only)")
    # the same TP with another divisor: TP is not the fix; the divisor it was saved with is
    why = layout.vocab_mismatch(layout.vocab_record(256, tp=2, divisor=128), 128, 64, tp=2)
    assert "resume at" not in why and "set model.make_vocab_size_divisible_by=128 so" in why
    # no divisor recorded (the trainer's manifests): found from the rows; none exists when TP does not divide them
    why = layout.vocab_mismatch(layout.vocab_record(768, tp=4), 700, 256, tp=2)  # this run: 1024 rows
    assert "resume at" not in why  # TP=4 with divisor 256 gives 1024 rows too
    d = int(re.search(r"make_vocab_size_divisible_by=(\d+) so", why).group(1))
    assert d == 192 and padded_vocab_size(700, d, 2) == 768  # the largest divisor <= 256 that gives 768 rows
    why = layout.vocab_mismatch(layout.vocab_record(129, tp=1), 129, 1, tp=2)
    assert "make_vocab_size_divisible_by" not in why.split(";")[1] and "convert it through HF" in why
    assert layout.vocab_mismatch(None, 151936, 128, tp=2) is None  # an old manifest: no field, no check
    assert layout.vocab_mismatch({}, 151936, 128, tp=2) is None
    # check_vocab reads the manifest make_ckpt / the trainer wrote
    d = make_ckpt(tmp_path, 1)
    layout.check_vocab(layout.read_manifest(d), d, 151936, 128, 2)  # no "vocab" in the manifest: passes
    layout.write_manifest(d, "train", 1, vocab=saved)
    manifest = layout.read_manifest(d)
    assert manifest["vocab"] == {"padded_vocab_size": 151936, "tensor_model_parallel_size": 1,
                                 "make_vocab_size_divisible_by": 128}
    with pytest.raises(CheckpointError, match=r"^checkpoint .*iter_0000001 has its vocabulary padded to 151936"):
        layout.check_vocab(manifest, d, 151936, 128, 2)
