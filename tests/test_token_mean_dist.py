from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "dist_scripts" / "token_mean_dp.py"


@pytest.mark.dist
def test_token_mean_gradient_over_micro_batches_and_dp_ranks_equals_full_batch(torchrun):
    # 2 data-parallel ranks x 3 micro-batches of different token counts; every aggregation mode; see the script
    out = torchrun(SCRIPT, 2)
    assert out.count("token_mean_dp OK") == 2
    for rank in (0, 1):
        assert f"rank {rank} token-mean: loss" in out and f"rank {rank} seq-mean-token-sum-norm: loss" in out
