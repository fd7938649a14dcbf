"""Dynamic-sampling group filter: a group whose responses all score the same has zero advantage
everywhere and carries no gradient, so it is dropped (DAPO keeps 0 < #correct < G)."""
from typing import Sequence

FILTER_METRICS = ("accuracy", "score", "reward")


def keep_group(values: Sequence[float], tol: float = 1e-6) -> bool:
    """Keep iff the values are not all equal (std > 0). A group of one is never kept."""
    return len(values) > 1 and max(values) - min(values) > tol


def group_metric(samples, metric: str) -> list[float]:
    """Per-sample values the filter compares: `accuracy` (the `correct` flag), `score` or `reward`."""
    if metric in ("accuracy", "acc"):
        return [1.0 if s.correct else 0.0 for s in samples]
    if metric in ("score", "reward"):
        return [float(getattr(s, metric)) for s in samples]
    raise ValueError(f"filter_metric={metric!r} is unknown; use one of {', '.join(FILTER_METRICS)}")


def group_verdict(samples, metric: str) -> str:
    """`keep`, or why the group is dropped: `all_correct`, `all_wrong`, or `all_equal` (mixed correctness
    but equal values, e.g. the reward after overlong shaping)."""
    if keep_group(group_metric(samples, metric)):
        return "keep"
    if all(s.correct for s in samples):
        return "all_correct"
    if not any(s.correct for s in samples):
        return "all_wrong"
    return "all_equal"
