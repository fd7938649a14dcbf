"""The algorithm section: loss_mode, rollout_correction, KL to a reference (validated before any process starts)."""
import pytest

from dapo_megatron.algo.rollout_correction import RolloutCorrectionConfig
from dapo_megatron.config import ConfigError, load_config
from dapo_megatron.models.tiny import make_tiny_hf_model


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("cfg")
    hf = make_tiny_hf_model(root / "hf", "qwen2.5")
    data = root / "train.jsonl"
    data.write_text('{"question": "1+1=", "answer": "2"}\n')
    return [f"model.path={hf}", f"data.path={data}", "rollout.rollout_batch_size=4",
            "rollout.n_samples_per_prompt=4", "actor.global_batch_size=8", "actor.micro_batch_size=2"]


def test_kl_and_loss_mode_and_rollout_correction_overrides(base):
    cfg = load_config(None, [*base, "algorithm.kl_coef=0.1", "algorithm.use_kl_in_reward=true",
                             "algorithm.loss_mode=gspo", "algorithm.clip_ratio_c=null",
                             "algorithm.clip_ratio_low=3.0e-4", "algorithm.clip_ratio_high=4.0e-4",
                             "algorithm.rollout_correction.level=sequence", "algorithm.rollout_correction.mode=mask",
                             "algorithm.rollout_correction.threshold=2"], world_size=1)
    a = cfg.algorithm
    assert (a.kl_coef, a.use_kl_in_reward, a.needs_reference, a.kl_in_loss) == (0.1, True, True, False)
    assert (a.loss_mode, a.clip_ratio_c, a.clip_ratio_low, a.clip_ratio_high) == ("gspo", None, 3e-4, 4e-4)
    assert a.rollout_correction == RolloutCorrectionConfig("sequence", "mask", 2.0)
    dapo = load_config(None, base, world_size=1).algorithm
    assert not dapo.needs_reference and not dapo.rollout_correction.enabled  # DAPO: no reference model is built


def test_tis_cap_still_works_and_maps(base):
    a = load_config(None, [*base, "algorithm.tis_cap=2.0"], world_size=1).algorithm
    assert a.rollout_correction == RolloutCorrectionConfig("token", "truncate", 2.0)


@pytest.mark.parametrize("overrides, message", [
    (["algorithm.tis_cap=2.0", "actor.recompute_old_logprobs=false"], "actor.recompute_old_logprobs=false"),
    (["algorithm.rollout_correction.threshold=2.0"], "rollout_correction.level is null"),
    (["algorithm.rollout_correction.level=tok"], "rollout_correction.level='tok'"),
    (["algorithm.loss_mode=cispo"], "clip_ratio_c .dual-clip. applies to loss_mode=vanilla only"),
    (["algorithm.loss_mode=grpo"], "loss_mode must be one of"),
])
def test_errors_name_the_key(base, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*base, *overrides], world_size=1)


def test_gspo_recipe_uses_the_papers_eps():
    from pathlib import Path

    import yaml

    from dapo_megatron.config import Config, _build

    path = Path(__file__).resolve().parents[1] / "examples" / "gspo_qwen2.5_7b" / "config.yaml"
    a = _build(Config, yaml.safe_load(path.read_text()), "").algorithm
    assert (a.loss_mode, a.clip_ratio_low, a.clip_ratio_high, a.clip_ratio_c) == ("gspo", 3e-4, 4e-4, None)
    assert a.loss_agg_mode == "seq-mean-token-mean" and a.kl_coef == 0.0
