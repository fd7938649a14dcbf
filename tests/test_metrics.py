"""Metrics log: a resumed run replaces the lines of the steps it replays."""
import json

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
