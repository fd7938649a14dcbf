"""The default verifier (math_dapo) on a labelled case set graded as a careful human would (tests/data)."""
import json
import time
from pathlib import Path

import pytest

from dapo_megatron.reward import math_dapo
from dapo_megatron.reward.pool import VerifierPool

CASES = [json.loads(line) for line in (Path(__file__).parent / "data" / "verifier_cases.jsonl").open(encoding="utf-8")]
REQUIRED = {"fraction", "unicode", "pi", "tuple", "interval", "units", "thousands", "aime", "percent", "hedge",
            "rounded", "merged"}


def test_case_set_covers_the_formats():
    assert len(CASES) >= 40
    assert REQUIRED <= {c["category"] for c in CASES}
    assert sum(c["correct"] for c in CASES) >= 20 and sum(not c["correct"] for c in CASES) >= 20


@pytest.mark.parametrize("case", CASES, ids=[f"{c['category']}:{c['response'].rsplit(chr(10), 1)[-1][:40]}"
                                             f"|{c['ground_truth']}" for c in CASES])
def test_case(case):
    assert math_dapo.verify(case["response"], case["ground_truth"]) is case["correct"], case["note"]


def test_case_set_through_the_pool():
    # the default path as the trainer runs it: worker processes, each call under the pool's timeout
    with VerifierPool("math_dapo", num_workers=2, timeout_s=10.0) as pool:
        got = pool.map([(c["response"], c["ground_truth"]) for c in CASES])
    assert all(r.status == "ok" for r in got)
    assert [r.correct for r in got] == [c["correct"] for c in CASES]


def test_symbolic_fallback_is_bounded_by_the_pool_timeout():
    # normalised strings differ, so math_dapo asks sympy, which hangs on 9^(9^(9^(9^9))): the pool kills it
    with VerifierPool("math_dapo", num_workers=1, timeout_s=1.0) as p:
        t0 = time.monotonic()
        got = p.map([("Answer: 9^{9^{9^{9^{9}}}}", "1"), ("Answer: 3/4", "\\frac{3}{4}")])
        assert time.monotonic() - t0 < 10.0
        assert (got[0].correct, got[0].status) == (False, "timeout")
        assert (got[1].correct, got[1].status) == (True, "ok")
