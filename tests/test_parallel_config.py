"""Cross-section config rules and parallel-size refusals: checked by `config.validate` before any process starts,
each one line naming the key and the fix; the CLI refuses the same inputs with no traceback and launches nothing."""
import json
from pathlib import Path

import pytest

from dapo_megatron.config import ConfigError, build_config, load_config
from dapo_megatron.models.tiny import make_tiny_hf_model
from dapo_megatron.parallel import ParallelConfig, check_sizes, check_supported, planned_world_size
from tests.helpers.forked import run_cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("pcfg")
    hf = make_tiny_hf_model(root / "hf", "qwen2.5")  # 4 heads, 2 kv heads, 4 layers, 1024 positions
    data = root / "train.jsonl"
    data.write_text(json.dumps({"question": "1+1=", "answer": "2"}) + "\n")
    return [f"model.path={hf}", f"data.path={data}", "rollout.rollout_batch_size=4",
            "rollout.n_samples_per_prompt=4", "actor.global_batch_size=8", "actor.micro_batch_size=2",
            "rollout.max_response_length=64"]


def _refused(base, overrides, world, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(None, [*base, *overrides], world_size=world)
    assert "\n" not in str(e.value)
    return str(e.value)


# ---- one default per section; cross-section rules


def test_overlong_section_without_enable_is_off(base, tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("overlong_buffer:\n  len: 4096\n")  # enable not written: the section's default is the Config's
    cfg = load_config(str(f), base, world_size=1)
    assert cfg.overlong_buffer.enable is False and build_config().overlong_buffer.enable is False


def test_overlong_len_must_fit_the_response_budget(base):
    _refused(base, ["overlong_buffer.enable=true", "overlong_buffer.len=65"], 1,
             r"overlong_buffer.len=65 exceeds rollout.max_response_length=64")
    cfg = load_config(None, [*base, "overlong_buffer.enable=true", "overlong_buffer.len=64"], world_size=1)
    assert cfg.overlong_buffer.len == 64
    # disabled shaping does not use len: not refused
    load_config(None, [*base, "overlong_buffer.len=4096"], world_size=1)


def test_loss_scale_factor_defaults_to_max_response_length(base):
    cfg = load_config(None, [*base, "algorithm.loss_agg_mode=seq-mean-token-sum-norm"], world_size=1)
    assert cfg.algorithm.loss_scale_factor == 64  # Dr. GRPO
    cfg = load_config(None, [*base, "algorithm.loss_agg_mode=seq-mean-token-sum-norm",
                             "algorithm.loss_scale_factor=100"], world_size=1)
    assert cfg.algorithm.loss_scale_factor == 100


@pytest.mark.parametrize("overrides, world, message", [
    (["rollout.rollout_batch_size=3"], 1, r"= 12 responses per step is not a multiple of actor.global_batch_size=8"),
    (["actor.micro_batch_size=4"], 4, r"actor.global_batch_size=8 must be a multiple of actor.micro_batch_size \(4\) "
                                      r"x data-parallel size \(4\)"),
    (["actor.micro_batch_size=2", "parallel.tensor_model_parallel_size=2"], 16,
     r"multiple of actor.micro_batch_size \(2\) x data-parallel size \(8\)"),
    (["actor.global_batch_size=0"], 1, r"actor.global_batch_size=0 must be >= 1"),
    (["eval.max_response_length=0"], 1, r"eval.max_response_length=0 must be >= 1"),
    (["data.max_prompt_length=960", "eval.max_response_length=100"], 1,
     r"data.max_prompt_length \(960\) \+ eval.max_response_length \(100\) exceeds the model's "
     r"max_position_embeddings=1024"),
    (["rollout.max_response_length=2000"], 1, r"rollout.max_response_length \(2000\) exceeds"),
    (["eval.n_samples=0"], 1, r"eval.n_samples=0 must be >= 1"),
])
def test_cross_section_rules(base, overrides, world, message):
    _refused(base, overrides, world, message)


def test_batch_sizes_that_tile_dp_pass(base):
    load_config(None, [*base, "actor.micro_batch_size=2"], world_size=4)  # 8 = 2 x DP 4
    load_config(None, [*base, "actor.micro_batch_size=1", "parallel.tensor_model_parallel_size=2",
                       "parallel.pipeline_model_parallel_size=2"], world_size=16)  # DP 4


# ---- every ParallelConfig field: refused in one line naming the field, or checked against the world / model


@pytest.mark.parametrize("overrides, world, message", [
    (["parallel.context_parallel_size=2"], 2,
     r"parallel.context_parallel_size=2 is not supported: megatron-core's local attention \(CPU\) has no context "
     r"parallelism.*set parallel.context_parallel_size=1"),
    (["parallel.expert_model_parallel_size=2"], 2,
     r"parallel.expert_model_parallel_size=2 needs a mixture-of-experts model; model.path is dense.*set it to 1"),
    (["parallel.virtual_pipeline_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"], 2,
     r"parallel.virtual_pipeline_model_parallel_size=2 is not supported.*set it to null"),
    (["parallel.sequence_parallel=true"], 1,
     r"parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size > 1.*set it to null or false"),
    (["parallel.tensor_model_parallel_size=2"], 3, r"world size 3 is not divisible by tensor_model_parallel_size"),
    (["parallel.pipeline_model_parallel_size=2"], 3, r"world size 3 is not divisible by.*pipeline_model_parallel_size"),
    (["parallel.tensor_model_parallel_size=4"], 4, r"tensor_model_parallel_size=4 must divide num_attention_heads=4 "
                                                   r"and num_key_value_heads=2"),
    (["parallel.pipeline_model_parallel_size=3"], 3, r"pipeline_model_parallel_size=3 must divide num_hidden_layers=4"),
    (["parallel.tensor_model_parallel_size=0"], 1, r"parallel.tensor_model_parallel_size=0 must be an integer >= 1"),
    (["parallel.distributed_timeout_minutes=0"], 1, r"parallel.distributed_timeout_minutes=0 must be an integer"),
    (["parallel.virtual_pipeline_model_parallel_size=0"], 1,
     r"parallel.virtual_pipeline_model_parallel_size=0 must be null or an integer >= 1"),
])
def test_parallel_fields_refused_in_one_line(base, overrides, world, message):
    _refused(base, overrides, world, message)


def test_expert_parallel_is_left_to_moe_models():
    # The dense-model refusal is keyed on the model's expert count: an MoE arch (num_experts > 0) passes.
    check_supported(ParallelConfig(expert_model_parallel_size=2), num_experts=8)
    with pytest.raises(ValueError, match="expert_model_parallel_size=4 must divide the model's num_experts=6"):
        check_supported(ParallelConfig(expert_model_parallel_size=4), num_experts=6)
    with pytest.raises(ValueError, match="expert_model_parallel_size=2 must divide data-parallel x context-parallel"):
        check_sizes(ParallelConfig(tensor_model_parallel_size=2, expert_model_parallel_size=2), 2)
    check_sizes(ParallelConfig(tensor_model_parallel_size=2, expert_model_parallel_size=2), 4)


def test_planned_world_counts_every_size_that_multiplies_the_world():
    assert planned_world_size(ParallelConfig()) == 1
    assert planned_world_size(ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)) == 4
    assert planned_world_size(ParallelConfig(tensor_model_parallel_size=2, context_parallel_size=2)) == 4
    assert planned_world_size(ParallelConfig(pipeline_model_parallel_size=2, expert_model_parallel_size=4)) == 8
    assert planned_world_size(ParallelConfig(context_parallel_size=2, expert_model_parallel_size=4)) == 4
    for cfg in (ParallelConfig(tensor_model_parallel_size=2, expert_model_parallel_size=2),
                ParallelConfig(context_parallel_size=2, pipeline_model_parallel_size=2)):
        check_sizes(cfg, planned_world_size(cfg))  # the planned world always tiles


# ---- through the CLI: one line on stderr, non-zero exit, nothing launched


@pytest.mark.parametrize("overrides, message", [
    (["parallel.context_parallel_size=2"], "config error: parallel.context_parallel_size=2 is not supported"),
    (["parallel.expert_model_parallel_size=2"], "config error: parallel.expert_model_parallel_size=2 needs a "
                                                "mixture-of-experts model"),
    (["parallel.tensor_model_parallel_size=3"], "config error: model.path="),
    (["parallel.sequence_parallel=true"], "config error: parallel.sequence_parallel=true needs "
                                          "parallel.tensor_model_parallel_size > 1"),
])
def test_cli_refuses_before_launch(base, overrides, message):
    rc, out, err = run_cli(["train", *base, *overrides], timeout=120)
    assert rc != 0
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("dapo-megatron train: " + message), err[-2000:]
    assert "Traceback" not in err and "launching" not in out


def test_make_vocab_size_divisible_by_is_checked(base):
    _refused(base, ["model.make_vocab_size_divisible_by=0"], 1,
             r"model.make_vocab_size_divisible_by=0 must be an integer >= 1")


def test_distributed_timeout_reaches_the_process_group(monkeypatch):
    """parallel.distributed_timeout_minutes is the timeout of torch.distributed and of megatron's groups."""
    import datetime

    import torch.distributed as dist
    from megatron.core import parallel_state

    from dapo_megatron import parallel
    from dapo_megatron.parallel import cpu_compat

    seen = {}
    monkeypatch.setattr(cpu_compat, "enable", lambda: None)  # no process-wide patching in this process
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: seen.update(pg=timeout))
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 1)
    monkeypatch.setattr(parallel_state, "model_parallel_is_initialized", lambda: False)
    monkeypatch.setattr(parallel_state, "initialize_model_parallel", lambda **kw: seen.update(mp=kw))
    monkeypatch.setattr(parallel, "seed_all", lambda seed: None)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.get(key, "127.0.0.1" if key ==
                           "MASTER_ADDR" else "29500"))
    parallel.initialize(ParallelConfig(distributed_timeout_minutes=7))
    assert seen["pg"] == datetime.timedelta(minutes=7) and seen["mp"]["distributed_timeout_minutes"] == 7
