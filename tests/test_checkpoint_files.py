"""Checkpoint folder rules that need no process group: `latest`, incomplete folders, pruning."""
import pytest

from dapo_megatron.train.checkpoint import _prune, _write_text_atomic, find_latest


def test_latest_names_the_complete_folder(tmp_path):
    assert find_latest(tmp_path) is None  # nothing saved yet
    (tmp_path / "iter_0000002" / "model").mkdir(parents=True)
    (tmp_path / "iter_0000004.tmp" / "model").mkdir(parents=True)  # a save killed half way: never picked
    _write_text_atomic(tmp_path / "latest", "iter_0000002")
    assert find_latest(tmp_path) == tmp_path / "iter_0000002"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("latest")] == ["latest"]  # no temp file left


def test_latest_pointing_at_an_incomplete_folder_is_an_error(tmp_path):
    (tmp_path / "iter_0000003").mkdir()
    (tmp_path / "latest").write_text("iter_0000003\n")
    with pytest.raises(FileNotFoundError, match="iter_0000003, which is missing or incomplete"):
        find_latest(tmp_path)


def test_prune_keeps_the_newest(tmp_path):
    for n in (1, 2, 3, 10):
        (tmp_path / f"iter_{n:07d}").mkdir()
    (tmp_path / "iter_0000011.tmp").mkdir()
    _prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000003", "iter_0000010", "iter_0000011.tmp"]
