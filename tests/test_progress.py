"""Off a terminal, rollout progress is plain lines (one per generation round, or every interval), not a tqdm bar."""
import io
import re

from dapo_megatron.train import progress as progress_mod
from dapo_megatron.train.progress import RolloutProgress


def test_one_line_per_round_off_a_terminal(monkeypatch):
    clock = iter([0.0, 1.0, 2.0, 3.0, 40.0, 41.0, 50.0])
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: next(clock))
    out = io.StringIO()  # not a TTY
    p = RolloutProgress(step=3, total=4, batch_size=4, interval_s=30.0, stream=out)  # t=0
    p(1, {"prompts_consumed": 4, "correct": 2, "responses": 4, "groups_generated": 4})  # t=1: round 1 -> line
    p(2, {"prompts_consumed": 4, "correct": 4, "responses": 8, "groups_generated": 4})  # t=2: same round, quiet
    p(2, {"prompts_consumed": 8, "correct": 5, "responses": 16, "groups_generated": 8})  # t=3: round 2 -> line
    p(3, {"prompts_consumed": 8, "correct": 6, "responses": 20, "groups_generated": 8})  # t=40: interval -> line
    p(3, {"prompts_consumed": 8, "correct": 6, "responses": 20, "groups_generated": 8})  # t=41: quiet
    p(4, {"prompts_consumed": 8, "correct": 8, "responses": 24, "groups_generated": 8})  # t=50: batch full -> line
    p.close()
    lines = out.getvalue().splitlines()
    assert lines == [
        "rollout 3: kept 1/4 groups, round 1, acc 0.50, elapsed 0m01s, eta 0m03s",
        "rollout 3: kept 2/4 groups, round 2, acc 0.31, elapsed 0m03s, eta 0m03s",
        "rollout 3: kept 3/4 groups, round 2, acc 0.30, elapsed 0m40s, eta 0m13s",
        "rollout 3: kept 4/4 groups, round 2, acc 0.33, elapsed 0m50s, eta 0m00s",
    ]
    assert not re.search(r"\r|it/s", out.getvalue())  # no bar redraws in a log file
