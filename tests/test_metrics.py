"""Metrics log: a resumed run replaces the lines of the steps it replays."""
import json

import pytest

from dapo_megatron.train.metrics import MetricsLogger


def test_resume_drops_replayed_steps(tmp_path, capsys):
    log = MetricsLogger(tmp_path, tensorboard=False)
    for step in (1, 2, 3):
        log.log(step, {"rollout/accuracy": step / 10, "note": "not a number"})
    log.close()
    assert "[step 3] acc=0.300" in capsys.readouterr().out
    log = MetricsLogger(tmp_path, tensorboard=False, start_step=2)  # checkpoint at 2; step 3 is replayed
    log.log(3, {"rollout/accuracy": 0.5})
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["rollout/accuracy"]) for r in rows] == [(1, 0.1), (2, 0.2), (3, 0.5)]
    assert "note" not in rows[0]  # only scalars are logged


def test_torn_last_line_is_dropped_with_a_warning_and_replays_are_kept_aside(tmp_path, capsys):
    log_file = tmp_path / "metrics.jsonl"
    whole = "".join(json.dumps({"step": s, "rollout/accuracy": s / 10}) + "\n" for s in (1, 2, 3))
    log_file.write_text(whole + '{"step": 4, "rollout/acc')  # what a kill or a full disk mid-write leaves
    log = MetricsLogger(tmp_path, tensorboard=False, start_step=2)  # checkpoint at 2: steps 3.. are replayed
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "torn line" in out and str(log_file) in out
    log.log(3, {"rollout/accuracy": 0.5})
    log.close()
    rows = [json.loads(line) for line in log_file.read_text().splitlines()]  # every line parses again
    assert [(r["step"], r["rollout/accuracy"]) for r in rows] == [(1, 0.1), (2, 0.2), (3, 0.5)]
    replaced = [json.loads(line) for line in (tmp_path / "metrics_replaced.jsonl").read_text().splitlines()]
    assert [r["step"] for r in replaced] == [3]  # the replayed step's old record is kept, not lost
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "metrics_replaced.jsonl"]  # no temp


def test_trim_is_atomic_a_failed_rewrite_leaves_the_old_log(tmp_path, monkeypatch):
    from dapo_megatron.train import metrics

    log_file = tmp_path / "metrics.jsonl"
    log_file.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)))
    before = log_file.read_bytes()

    def crash(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(metrics.os, "replace", crash)
    with pytest.raises(OSError):
        metrics.trim_log(log_file, 1, warn=lambda *_: None)
    assert log_file.read_bytes() == before  # the old file is whole until the new one replaces it
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    metrics.trim_log(log_file, 1, warn=lambda *_: None)
    assert [json.loads(x)["step"] for x in log_file.read_text().splitlines()] == [1]


def test_kill_while_logging_leaves_a_torn_line(tmp_path):
    """The DAPO_FAULT=log@N hook writes half the line and SIGKILLs: the file state a real crash leaves."""
    import subprocess
    import sys

    code = ("from dapo_megatron.train.metrics import MetricsLogger\n"
            f"log = MetricsLogger({str(tmp_path)!r}, tensorboard=False)\n"
            "for s in (1, 2, 3): log.log(s, {'x': s})\n")
    proc = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, "DAPO_FAULT": "log@2"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9
    text = (tmp_path / "metrics.jsonl").read_text()
    assert text.count("\n") == 1 and not text.endswith("\n")  # step 1 whole, step 2 torn
