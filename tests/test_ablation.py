"""tools/ablation.py, the 2-configuration 1-seed smoke version: it runs both, writes the table and the plots."""
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import ablation  # noqa: E402


def test_cumulative_configurations_follow_the_paper():
    configs = ablation.load_configs()
    assert list(configs) == ["naive_grpo", "overlong_filtering", "clip_higher", "soft_overlong_punishment",
                             "token_level_loss", "dynamic_sampling"]
    naive, full = configs["naive_grpo"], configs["dynamic_sampling"]
    assert (naive["algorithm.clip_ratio_high"], full["algorithm.clip_ratio_high"]) == (0.2, 0.28)
    assert (naive["algorithm.loss_agg_mode"], full["algorithm.loss_agg_mode"]) == ("seq-mean-token-mean", "token-mean")
    assert not naive["overlong_buffer.mask_truncated"] and full["overlong_buffer.mask_truncated"]
    assert not naive["overlong_buffer.enable"] and full["overlong_buffer.enable"]
    assert not naive["dynamic_sampling.enable"] and full["dynamic_sampling.enable"]
    # each configuration differs from the one before it in exactly its own switches
    import yaml

    own = yaml.safe_load((REPO / "examples" / "ablation" / "configs.yaml").read_text())
    names = list(configs)
    for prev, cur in zip(names, names[1:]):
        changed = {k for k in configs[cur] if configs[cur][k] != configs[prev].get(k)}
        assert changed == set(own[cur]), (prev, cur)


def test_task_splits_are_disjoint_answers_right_and_flat(tmp_path):
    import collections
    import json

    ablation.make_task(tmp_path)
    train = [json.loads(x) for x in (tmp_path / "train.jsonl").read_text().splitlines()]
    held = [json.loads(x) for x in (tmp_path / "heldout.jsonl").read_text().splitlines()]
    assert len(train) == 9 * 24 and len(held) == 9 * 8
    assert not {r["question"] for r in train} & {r["question"] for r in held}
    prefix = lambda rows: {r["question"].split("|")[0] for r in rows}  # noqa: E731
    assert not prefix(train) & prefix(held)  # held-out prefixes are never trained on
    for r in train + held:  # `qz|3+4=` -> 7
        a, b = r["question"].split("|")[1].rstrip("=").split("+")
        assert 3 <= int(a) <= 7 and 3 <= int(b) <= 7 and r["answer"] == str(int(a) + int(b))
    for rows, k in ((train, 24), (held, 8)):  # no dominant answer: the best constant scores 1/9 on each split
        assert collections.Counter(r["answer"] for r in rows) == {str(s): k for s in range(6, 15)}
    assert {len(r["answer"]) for r in train} == {1, 2}  # answers of variable length
    sums = lambda rows: {r["question"].split("|")[1] for r in rows}  # noqa: E731
    assert sums(held) == sums(train) and len(sums(train)) == 25


@pytest.mark.dist
def test_smoke_two_configurations_one_seed_writes_table_and_plots(tmp_path):
    out = tmp_path / "out"
    summary = ablation.main(["--configs", "naive_grpo,dynamic_sampling", "--seeds", "1", "--budget-tokens", "500",
                             "--warm-steps", "10",
                             "--work", str(tmp_path / "work"), "--out", str(out)])
    table = (out / "table.md").read_text()
    assert "| naive_grpo |" in table and "| dynamic_sampling |" in table and "python tools/ablation.py" in table
    assert "| tokens to target |" in table and "| truncated, whole run |" in table
    for name in ("naive_grpo", "dynamic_sampling"):
        (run,) = summary[name]
        assert run["tokens"] >= 500 and run["steps"] >= 1  # stopped by the budget, not by the step cap
    assert all((out / f).stat().st_size > 1000 for f in ("accuracy.png", "heldout.png", "entropy.png", "length.png"))
