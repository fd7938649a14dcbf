"""A resume says what it resumed from: one line with the folder, its step, its kind and why it was chosen."""
from dapo_megatron.models import ckpt_layout as layout
from dapo_megatron.train.checkpoint import resume_line


def _ckpt(root, it, kind=layout.KIND_TRAIN):
    folder = root / layout.iter_name(it)
    for part in layout.REQUIRED[kind]:
        p = folder / part
        if part.endswith(".json"):
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("{}")
        else:
            p.mkdir(parents=True)
            (p / "x").write_text("w")
    layout.write_manifest(folder, kind, it)
    return folder


def _line(load):
    path, manifest = layout.resolve(load, log=lambda msg: None)
    return resume_line(load, path, manifest)


def test_the_line_names_folder_step_kind_and_reason(tmp_path):
    root = tmp_path / "ck"
    _ckpt(root, 2)
    newest = _ckpt(root, 4)
    layout.write_latest(root, newest.name)
    assert _line(root) == f"resuming from {newest} (step 4, kind train): named by {root / 'latest'}"
    assert _line(root / "iter_0000002") == f"resuming from {root / 'iter_0000002'} (step 2, kind train): pinned by " \
                                          "trainer.load"
    (root / "latest").write_bytes(b"\xff\xfe")
    assert _line(root).endswith("(step 4, kind train): the newest complete one "
                                f"({root / 'latest'} missing or unreadable)")
    layout.write_latest(root, newest.name)
    (newest / layout.TRAINER_STATE).unlink()  # damaged newest: the fallback
    assert _line(root) == (f"resuming from {root / 'iter_0000002'} (step 2, kind train): the newest complete one, "
                           "after a fallback from a damaged newer checkpoint")
    model = _ckpt(tmp_path / "conv", 0, layout.KIND_MODEL)
    assert _line(model) == (f"resuming from {model} (step 0, kind model): pinned by trainer.load; model-only: "
                            "initial weights, fresh optimizer, step 0")
