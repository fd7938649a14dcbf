"""Every loss mode through the real Actor: DP=2 (world 2) gives the DP=1 step (fp32, max abs diff < 1e-6)."""
from pathlib import Path

import pytest
import torch

from dapo_megatron.models.tiny import make_tiny_hf_model

SCRIPT = Path(__file__).parent / "dist_scripts" / "loss_modes_dp.py"


@pytest.mark.dist
def test_every_loss_mode_dp2_equals_dp1(torchrun, tmp_path):
    hf = make_tiny_hf_model(tmp_path / "hf", "qwen2.5", seed=3)
    torchrun(SCRIPT, 1, hf, tmp_path / "dp1.pt")
    torchrun(SCRIPT, 2, hf, tmp_path / "dp2.pt")
    one, two = torch.load(tmp_path / "dp1.pt"), torch.load(tmp_path / "dp2.pt")
    assert set(one) == set(two) == {"vanilla", "gspo", "cispo"}
    for mode in one:
        m1, m2 = one[mode]["metrics"], two[mode]["metrics"]
        assert m1["actor/grad_norm"] > 0 and m1["actor/update_ok"] == 1.0
        for k in m1:
            assert m2[k] == pytest.approx(m1[k], abs=1e-6), (mode, k)
        for part in ("grads", "weights"):
            diff = max((one[mode][part][n] - two[mode][part][n]).abs().max().item() for n in one[mode][part])
            assert diff < 1e-6, (mode, part, diff)
            print(f"{mode} {part}: max |DP2 - DP1| = {diff:.2e}")
    # the paths were exercised: clips bind, the sequence mask drops some responses, the KL is non-zero
    assert one["vanilla"]["metrics"]["actor/rollout_corr_truncated_token_frac"] > 0
    assert 0 < one["gspo"]["metrics"]["actor/rollout_corr_masked_seq_frac"] < 1
    assert one["gspo"]["metrics"]["actor/pg_clipfrac_high"] + one["gspo"]["metrics"]["actor/pg_clipfrac_low"] > 0
    assert one["cispo"]["metrics"]["actor/kl"] > 0
    assert one["vanilla"]["grads"].keys() == one["cispo"]["grads"].keys()
    assert not torch.equal(one["vanilla"]["weights"]["embedding.word_embeddings.weight"],
                           one["gspo"]["weights"]["embedding.word_embeddings.weight"])
