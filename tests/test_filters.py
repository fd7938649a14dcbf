import pytest

from dapo_megatron.algo.filters import group_metric, group_verdict, keep_group
from dapo_megatron.rollout.sample import Sample


def _group(correct, rewards=None):
    rewards = rewards or [1.0 if c else -1.0 for c in correct]
    return [Sample(prompt_ids=[1], correct=c, score=float(c), reward=r) for c, r in zip(correct, rewards)]


@pytest.mark.parametrize("values,keep", [
    ([1, 0, 0, 0], True), ([1, 1, 1, 1], False), ([0, 0, 0, 0], False), ([1.0, -0.75], True),
    ([0.5], False), ([], False), ([0.3, 0.3 + 1e-9], False),
])
def test_keep_group(values, keep):
    assert keep_group(values) is keep


def test_group_metric_and_verdict():
    g = _group([True, False, True])
    assert group_metric(g, "accuracy") == [1.0, 0.0, 1.0]
    assert group_metric(g, "score") == [1.0, 0.0, 1.0]
    assert group_metric(g, "reward") == [1.0, -1.0, 1.0]
    assert group_verdict(g, "accuracy") == "keep"
    assert group_verdict(_group([True, True]), "accuracy") == "all_correct"
    assert group_verdict(_group([False, False]), "reward") == "all_wrong"
    # A correct-but-overlong response can land on the wrong reward: mixed accuracy, equal rewards.
    mixed = _group([True, False], rewards=[-1.0, -1.0])
    assert group_verdict(mixed, "reward") == "all_equal"
    assert group_verdict(mixed, "accuracy") == "keep"
    # ...and a uniformly correct group can differ in reward after shaping.
    assert group_verdict(_group([True, True], rewards=[1.0, 0.5]), "reward") == "keep"


def test_unknown_metric():
    with pytest.raises(ValueError, match="filter_metric"):
        group_metric(_group([True]), "entropy")
