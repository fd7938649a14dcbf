"""One config system: a dataclass per section, loaded from YAML, overridden by dotted `key.sub=value` arguments.

Sections reuse the dataclasses of the stages they configure (algo.loss.PolicyLossConfig, reward.RewardConfig,
rollout.buffer.DynamicSamplingConfig, ...), so a key means the same thing everywhere. Validation happens here,
before any process group starts, with messages naming the key and the fix.
"""
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .algo.loss import PolicyLossConfig
from .algo.overlong import OverlongConfig
from .models.builder import ModelConfig
from .parallel import ParallelConfig
from .reward.config import RewardConfig
from .rollout.buffer import DynamicSamplingConfig
from .train.actor import ActorConfig


class ConfigError(ValueError):
    pass


@dataclass
class AlgorithmConfig(PolicyLossConfig):
    norm_adv_by_std: bool = True  # False: Dr. GRPO (no std normalisation)
    leave_one_out: bool = False  # baseline = mean of the other responses of the group
    adv_eps: float = 1e-6


@dataclass
class DataConfig:
    path: str = ""  # JSONL or Parquet (DAPO-Math-17k layout or {question, answer})
    template: str = "dapo"  # dapo | none | a format string with {question}
    apply_chat_template: bool = True
    max_prompt_length: Optional[int] = None
    shuffle: bool = True
    seed: int = 0


@dataclass
class RolloutConfig:
    backend: str = "embedded"  # embedded (in-process CPU/GPU engine) | http (rollout.urls) | sglang (launch servers)
    urls: list = field(default_factory=list)  # SGLang (or router) URLs for backend=http
    rollout_batch_size: int = 8  # kept prompt groups per step
    n_samples_per_prompt: int = 8
    max_response_length: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_concurrency: int = 64
    request_timeout_s: float = 600.0
    engine_max_batch_size: int = 64  # embedded engine
    deterministic: bool = False  # embedded engine: batch-invariant generation (bitwise-reproducible runs, slower)
    weight_sync: str = "auto"  # auto | tensor | disk | distributed
    sglang_num_servers: int = 1
    sglang_tp_size: int = 1
    sglang_ep_size: int = 1  # MoE: SGLang --ep-size, experts split over this many of each server's TP ranks
    sglang_mem_fraction_static: float = 0.7
    sglang_base_port: int = 30000
    sglang_router: bool = False
    colocate: bool = True  # release engine memory while training (GPU)

    def __post_init__(self):
        if self.sglang_ep_size < 1 or self.sglang_tp_size % self.sglang_ep_size:
            raise ConfigError(f"rollout.sglang_ep_size={self.sglang_ep_size} must divide rollout.sglang_tp_size="
                              f"{self.sglang_tp_size} (SGLang splits each server's TP ranks into EP groups)")
        if self.backend not in ("embedded", "http", "sglang"):
            raise ConfigError(f"rollout.backend={self.backend!r}; use embedded, http or sglang")
        if self.backend == "http" and not self.urls:
            raise ConfigError("rollout.backend=http needs rollout.urls (SGLang server or router URLs)")
        if self.weight_sync not in ("auto", "tensor", "disk", "distributed"):
            raise ConfigError(f"rollout.weight_sync={self.weight_sync!r}; use auto, tensor, disk or distributed")


@dataclass
class TrainerConfig:
    num_steps: int = 100  # rollout steps (slime's num_rollout)
    run_dir: str = "runs/dapo"  # TensorBoard, metrics.jsonl, resolved config
    save: Optional[str] = None  # checkpoint root; default: <run_dir>/checkpoints
    save_interval: int = 0  # steps; 0 = only at the end
    keep_last: int = 0  # keep this many checkpoints (0 = all)
    load: Optional[str] = None  # checkpoint root (resume from its `latest`) or an iter_* folder
    eval_interval: int = 0
    seed: int = 1234
    tensorboard: bool = True


@dataclass
class EvalConfig:
    path: Optional[str] = None  # held-out prompts (e.g. ../shared/data/aime24.jsonl)
    n_samples: int = 4  # avg@k (DAPO: 32)
    temperature: float = 1.0
    top_p: float = 0.7
    max_response_length: Optional[int] = None  # default: rollout.max_response_length
    max_prompts: Optional[int] = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    dynamic_sampling: dict = field(default_factory=dict)  # DynamicSamplingConfig fields (built by .sampling())
    reward: RewardConfig = field(default_factory=RewardConfig)
    overlong_buffer: OverlongConfig = field(default_factory=lambda: OverlongConfig(enable=False))
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def sampling(self) -> DynamicSamplingConfig:
        return DynamicSamplingConfig(rollout_batch_size=self.rollout.rollout_batch_size,
                                     n_samples_per_prompt=self.rollout.n_samples_per_prompt, **self.dynamic_sampling)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Sections stored as dicts on Config, with the dataclass that types them.
_FIELD_SECTIONS = {"Config": {"dynamic_sampling": DynamicSamplingConfig}}


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]}; valid keys in "
                          f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(names))}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value or {}, f"{prefix}{key}.")
        elif key in _FIELD_SECTIONS.get(cls.__name__, {}):
            kwargs[key] = _coerce_fields(_FIELD_SECTIONS[cls.__name__][key], value or {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, hint, f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from e


class _Raw(str):
    """A command-line override value, parsed as YAML unless its field is a string."""


def _coerce_fields(cls, data: dict, prefix: str) -> dict:
    """Type-check a section kept as a dict (its dataclass needs values from other sections to be built)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.')} must be a mapping")
    hints = typing.get_type_hints(cls)
    derived = {"rollout_batch_size", "n_samples_per_prompt"}
    for key in data:
        if key in derived:
            raise ConfigError(f"{prefix}{key} is set in the rollout section: use rollout.{key}")
        if key not in hints:
            raise ConfigError(f"unknown config key {prefix}{key}; valid keys: {', '.join(sorted(set(hints) - derived))}")
    return {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}


def _coerce(value, hint, key):
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    target = args[0] if origin in (typing.Union, types.UnionType) and args else hint
    if isinstance(value, _Raw):
        value = str(value) if target is str and value not in ("null", "~", "") else yaml.safe_load(value)
    if value is None:
        return None
    if target is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if target in (int, float, str, bool) and not isinstance(value, target):
        raise ConfigError(f"{key}={value!r} must be of type {target.__name__}")
    return value


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {k} is not a section")
    node[keys[-1]] = value


def load_config(path: Optional[str] = None, overrides: list[str] = (), world_size: Optional[int] = None) -> Config:
    """Read YAML + overrides and validate for `world_size` processes (default: this launch's WORLD_SIZE)."""
    cfg = build_config(path, overrides)
    validate(cfg, world_size)
    return cfg


def build_config(path: Optional[str] = None, overrides: list[str] = ()) -> Config:
    """Read YAML + overrides into typed sections (per-key checks only; `validate` does the cross-section ones)."""
    tree: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} not found")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p} is not valid YAML: {e}") from e
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), _Raw(raw))
    return _build(Config, tree, "")


def validate(cfg: Config, world_size: Optional[int] = None) -> None:
    """Cross-section checks that no single section can make."""
    from .parallel import check_sizes, world_size_from_env

    try:
        cfg.sampling()
    except (ValueError, TypeError) as e:
        raise ConfigError(f"dynamic_sampling: {e}") from e
    if cfg.algorithm.kl_coef != 0.0:
        raise ConfigError("algorithm.kl_coef != 0 needs reference-policy log-probs, which the trainer does not compute "
                          "yet; DAPO trains without KL: set algorithm.kl_coef=0")
    if not cfg.model.path:
        raise ConfigError("model.path is required: a Hugging Face model folder (config.json + safetensors)")
    if not (Path(cfg.model.path) / "config.json").is_file():
        raise ConfigError(f"model.path={cfg.model.path} has no config.json; point it at a Hugging Face model folder")
    if not cfg.data.path or not Path(cfg.data.path).is_file():
        raise ConfigError(f"data.path={cfg.data.path!r} is not a file; give a JSONL or Parquet prompt file")
    world = world_size or world_size_from_env()
    try:
        check_sizes(cfg.parallel, world)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    from .models.hf_config import arch_from_hf, check_parallel_sizes, load_hf_config

    try:  # the model must fit the parallel layout before any process starts
        arch = arch_from_hf(load_hf_config(cfg.model.path))
        check_parallel_sizes(arch, cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size,
                             cfg.parallel.expert_model_parallel_size, cfg.parallel.expert_tensor_parallel_size)
        import torch

        from .models import moe

        moe.check_options(moe.options_of(cfg.model), arch.moe, on_gpu=torch.cuda.is_available())
    except ValueError as e:
        raise ConfigError(f"model.path={cfg.model.path}: {e}") from e
    dp = world // (cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size)
    responses = cfg.rollout.rollout_batch_size * cfg.rollout.n_samples_per_prompt
    if responses % cfg.actor.global_batch_size:
        raise ConfigError(
            f"rollout.rollout_batch_size x rollout.n_samples_per_prompt = {responses} responses per step is not a "
            f"multiple of actor.global_batch_size={cfg.actor.global_batch_size}")
    if cfg.actor.global_batch_size % (cfg.actor.micro_batch_size * dp):
        raise ConfigError(
            f"actor.global_batch_size={cfg.actor.global_batch_size} must be a multiple of actor.micro_batch_size "
            f"({cfg.actor.micro_batch_size}) x data-parallel size ({dp})")
    if cfg.trainer.load:
        load = Path(cfg.trainer.load)
        if not ((load / "latest").is_file() or (load / "model").is_dir()):
            raise ConfigError(f"trainer.load={load} holds no checkpoint (no `latest` file or model/ folder)")
    if cfg.eval.path and not Path(cfg.eval.path).is_file():
        raise ConfigError(f"eval.path={cfg.eval.path} is not a file")
