"""Config: YAML + dotted overrides, and validation errors that name the key and the fix."""
from pathlib import Path

import pytest
import yaml

from dapo_megatron.config import Config, ConfigError, _build, load_config
from dapo_megatron.models.tiny import make_tiny_hf_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("cfg")
    hf = make_tiny_hf_model(root / "hf", "qwen2.5")
    data = root / "train.jsonl"
    data.write_text('{"question": "1+1=", "answer": "2"}\n')
    return [f"model.path={hf}", f"data.path={data}", "rollout.rollout_batch_size=4",
            "rollout.n_samples_per_prompt=4", "actor.global_batch_size=8", "actor.micro_batch_size=2"]


def test_yaml_and_overrides(base, tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"algorithm": {"clip_ratio_high": 0.3}, "data": {"template": "Q: {question}"}}))
    cfg = load_config(str(f), [*base, "algorithm.clip_ratio_low=0.1", "data.template={question}",
                               "dynamic_sampling.enable=false", "trainer.load=null"], world_size=1)
    assert (cfg.algorithm.clip_ratio_low, cfg.algorithm.clip_ratio_high) == (0.1, 0.3)
    assert cfg.data.template == "{question}"  # a string field keeps the raw text, not YAML's {question: null}
    assert cfg.sampling().enable is False and cfg.sampling().rollout_batch_size == 4
    assert cfg.actor.lr == 1e-6 and cfg.algorithm.loss_agg_mode == "token-mean"  # DAPO defaults


def test_exponent_numbers_are_floats_in_yaml_and_overrides(base, tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("actor:\n  lr: 5e-7\n  weight_decay: 1E3\nalgorithm:\n  adv_eps: 1e-8\n")
    cfg = load_config(str(f), base, world_size=1)
    assert (cfg.actor.lr, cfg.actor.weight_decay, cfg.algorithm.adv_eps) == (5e-7, 1000.0, 1e-8)
    cfg = load_config(str(f), [*base, "actor.lr=1e-6", "algorithm.clip_ratio_high=2.8E-1", "actor.weight_decay=-1e-2"],
                      world_size=1)
    assert (cfg.actor.lr, cfg.algorithm.clip_ratio_high, cfg.actor.weight_decay) == (1e-6, 0.28, -0.01)
    assert isinstance(cfg.actor.lr, float)
    with pytest.raises(ConfigError, match="trainer.num_steps=1000.0 must be of type int"):
        load_config(None, [*base, "trainer.num_steps=1e3"], world_size=1)  # a float, not silently an int
    assert load_config(None, [*base, "data.template=1e-6 {question}"], world_size=1).data.template == "1e-6 {question}"


@pytest.mark.parametrize("override, message", [
    ("algorithm.clip_ratio_hgh=0.3", "unknown config key algorithm.clip_ratio_hgh"),
    ("algorithm.clip_ratio_high=abc", "algorithm.clip_ratio_high='abc' must be of type float"),
    ("dynamic_sampling.rollout_batch_size=3", "use rollout.rollout_batch_size"),
    ("dynamic_sampling.on_exhausted=retry", "on_exhausted"),
    ("actor.global_batch_size=12", "not a multiple of actor.global_batch_size=12"),
    ("actor.micro_batch_size=3", "multiple of actor.micro_batch_size"),
    ("parallel.tensor_model_parallel_size=3", "world size 2 is not divisible by tensor_model_parallel_size"),
    ("trainer.load=/nonexistent/ckpt", "trainer.load=/nonexistent/ckpt holds no checkpoint"),
    ("model.path=/nonexistent", "model.path=/nonexistent has no config.json"),
    ("rollout.backend=vllm", "rollout.backend='vllm'"),
    ("nokey", "must look like key.sub=value"),
    ("algorithm.use_kl_in_reward=true", "use_kl_in_reward=true needs kl_coef > 0"),
    ("algorithm.loss_mode=gspo", "set clip_ratio_c: null"),
    ("actor.lr=[1", "override actor.lr=[1: not a valid value"),
])
def test_errors_name_the_key(base, override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(None, [*base, override], world_size=2)


def test_model_must_fit_the_parallel_layout(base):
    with pytest.raises(ConfigError, match="pipeline_model_parallel_size=3 must divide num_hidden_layers=4"):
        load_config(None, [*base, "parallel.pipeline_model_parallel_size=3"], world_size=3)


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*/config.yaml")), ids=lambda p: p.parent.name)
def test_example_configs_use_valid_keys(path):
    cfg = _build(Config, yaml.safe_load(path.read_text()), "")
    cfg.sampling()
    responses = cfg.rollout.rollout_batch_size * cfg.rollout.n_samples_per_prompt
    assert responses % cfg.actor.global_batch_size == 0


def _optimizer_steps_per_rollout_step(cfg) -> int:
    return cfg.rollout.rollout_batch_size * cfg.rollout.n_samples_per_prompt // cfg.actor.global_batch_size \
        * cfg.actor.ppo_epochs


def test_paper_recipe_values():
    cfg = _build(Config, yaml.safe_load((REPO / "examples/dapo_qwen2.5_32b/config.yaml").read_text()), "")
    assert (cfg.algorithm.clip_ratio_low, cfg.algorithm.clip_ratio_high, cfg.algorithm.kl_coef) == (0.2, 0.28, 0.0)
    assert (cfg.rollout.rollout_batch_size, cfg.rollout.n_samples_per_prompt, cfg.actor.global_batch_size) == \
        (512, 16, 512)
    assert (cfg.rollout.max_response_length, cfg.overlong_buffer.len, cfg.actor.lr) == (20480, 4096, 1e-6)
    assert cfg.overlong_buffer.enable and cfg.algorithm.loss_agg_mode == "token-mean" and cfg.sampling().enable
    # The scheduler counts optimizer steps (one per mini-batch): the paper's warmup is 20 *rollout* steps.
    assert _optimizer_steps_per_rollout_step(cfg) == 16
    assert cfg.actor.lr_warmup_steps == 20 * 16


@pytest.mark.parametrize("name", ["dapo_qwen2.5_32b", "dapo_qwen2.5_7b"])
def test_recipe_warmup_is_twenty_rollout_steps(name):
    cfg = _build(Config, yaml.safe_load((REPO / "examples" / name / "config.yaml").read_text()), "")
    assert cfg.actor.lr_warmup_steps / _optimizer_steps_per_rollout_step(cfg) == 20
