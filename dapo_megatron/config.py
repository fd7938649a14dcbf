"""One config system: a dataclass per section, loaded from YAML, overridden by dotted `key.sub=value` arguments.

Sections reuse the dataclasses of the stages they configure (algo.loss.PolicyLossConfig, reward.RewardConfig,
rollout.buffer.DynamicSamplingConfig, ...), so a key means the same thing everywhere. Validation happens here,
before any process group starts, with messages naming the key and the fix.
"""
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import yaml

from .algo.loss import PolicyLossConfig
from .algo.overlong import OverlongConfig
from .models.builder import ModelConfig
from .parallel import ParallelConfig
from .reward.config import RewardConfig
from .rollout.backends import BACKENDS, backend_names
from .rollout.buffer import STALE_POLICIES, DynamicSamplingConfig
from .rollout.multi_turn import MultiTurnConfig
from .rollout.weight_sync import weight_sync_modes
from .train.actor import ActorConfig
from .train.trackers import MlflowConfig, WandbConfig, check_loggers


class ConfigError(ValueError):
    pass


@dataclass
class AlgorithmConfig(PolicyLossConfig):
    """Loss (loss_mode, clips, agg, KL, rollout_correction: see algo/loss.py) plus the advantage estimator."""
    norm_adv_by_std: bool = True  # False: Dr. GRPO (no std normalisation)
    leave_one_out: bool = False  # baseline = mean of the other responses of the group
    adv_eps: float = 1e-6
    # loss_scale_factor defaults to rollout.max_response_length (Dr. GRPO); validate() fills it in, so the section
    # alone does not refuse it as missing.
    loss_scale_factor_default: ClassVar[Optional[str]] = "rollout.max_response_length"


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
    # auto | tensor (embedded: in-process copy; sglang: CUDA IPC to one colocated TP-1 server) | disk (needs a
    # filesystem shared with the engines) | distributed (NCCL; engines on GPUs of their own)
    weight_sync: str = "auto"
    weight_sync_bucket_mb: float = 512  # each pipeline stage sends its weights in buckets of this size
    # Deadline of each step of a weight sync (a bucket, an engine's update call, a broadcast): past it, one line
    # naming the engine and the stage, exit 2, instead of a hang (docs/fault_tolerance.md)
    weight_sync_timeout_s: float = 600.0
    # Every N-th weight sync, compare each engine's weights with the trainer's, tensor by tensor (0: off); a
    # difference stops the run in one line naming the first differing tensor, before any step trains on it
    check_weight_sync: int = 0
    # Engines this launch starts in processes of their own (rollout.backend=embedded_http): process and /health
    # watched this often; a dead or hung one restarted, at most max_engine_restarts times within restart_window_s
    health_interval_s: float = 5.0
    max_engine_restarts: int = 3
    restart_window_s: float = 3600.0
    # disk sync: the folder rank 0 writes and the engines read (only under it); default <run_dir>/weight_sync. Name a
    # shared folder when engines run on nodes of their own (`dapo-megatron engines`) with run folders of their own.
    weight_sync_dir: Optional[str] = None
    # how long the trainer waits (/health) for engines on nodes with no trainer rank, and (backend=http) for one of
    # rollout.urls to come back when all are down
    engine_wait_s: float = 900.0
    sglang_num_servers: int = 1  # backend=sglang: servers; embedded_http: engine processes (on its one node)
    sglang_tp_size: int = 1
    sglang_ep_size: int = 1  # MoE: SGLang --ep-size, experts split over this many of each server's TP ranks
    sglang_mem_fraction_static: float = 0.7
    sglang_base_port: int = 30000  # server i: + 10 i; the embedded engine of an engine-only node listens here
    sglang_router: bool = False
    # backend=sglang: the interpreter that runs `-m sglang.launch_server` (and the router); default the trainer's.
    # For sglang in an environment of its own (e.g. tools/.venv-sglang/bin/python, the CPU test venv).
    sglang_python: Optional[str] = None
    # backend=sglang: more SGLang server flags, passed through as given (e.g. [--max-total-tokens, "4096"]); the
    # flags the launcher sets from other keys are refused here (rollout/sglang_launcher.py OWNED_FLAGS).
    sglang_extra_args: list = field(default_factory=list)
    colocate: bool = True  # engines share the trainer's GPUs and release memory while it trains (GPU)
    rollout_nodes: int = 0  # colocate=false: the last N nodes run the engines (`dapo-megatron plan` shows where)
    # Address the engines this launch starts bind to. Unset: 127.0.0.1 on one node; on several, each node's own
    # ($DAPO_ROLLOUT_HOST, set per node, else its hostname's address). Several nodes take only unset or 0.0.0.0.
    host: Optional[str] = None
    # Engines and router answer only `Authorization: Bearer <key>` (SGLang's --api-key). Default: env
    # DAPO_ROLLOUT_API_KEY, else a fresh key per run. Never written to config.json or logs.
    api_key: Optional[str] = None
    # 0: generate, then train. 1: the next step's rollout generates while this step trains (one step off-policy;
    # train/rollout_ahead.py); every sample is at most one weight version behind, and the pipeline drains before
    # each checkpoint so that a resume is exact. k >= 2: a producer generates continuously, at most k versions ahead
    # of the trainer (train/rollout_producer.py); a group with a token sampled by weights older than the training
    # version - k is stale (stale_policy); a checkpoint saves buffered groups and which prompts are in flight.
    async_steps: int = 0
    # async_steps >= 2: a stale group is dropped (counted in rollout/stale_dropped) or generated again
    stale_policy: str = "drop"
    # async_steps >= 2: at a weight update in-flight generations pause (SGLang /pause_generation mode retract), take
    # the new weights and continue; each token keeps the version that sampled it (Sample.weight_versions). Off: an
    # update waits for running requests (embedded engine) or aborts them (SGLang; their groups are generated again).
    partial_rollout: bool = False
    # MoE: engines return the experts each token was routed to (SGLang --enable-return-routed-experts + the request's
    # return_routed_experts). Set by actor.routing_replay=r3 (validate); do not set it alone.
    return_routed_experts: bool = False
    multi_turn: MultiTurnConfig = field(default_factory=MultiTurnConfig)  # tool calls (rollout/multi_turn.py)

    def __post_init__(self):
        if self.async_steps < 0:
            raise ConfigError(f"rollout.async_steps={self.async_steps}; use 0 (synchronous), 1 (one step off-policy) "
                              "or k >= 2 (continuous, at most k versions behind)")
        if self.stale_policy not in STALE_POLICIES:
            raise ConfigError(f"rollout.stale_policy={self.stale_policy!r}; use drop or regenerate")
        if self.async_steps < 2 and (self.partial_rollout or self.stale_policy != "drop"):
            key = "partial_rollout=true" if self.partial_rollout else f"stale_policy={self.stale_policy}"
            raise ConfigError(f"rollout.{key} needs rollout.async_steps >= 2 (with {self.async_steps} no weight update "
                              "happens during a rollout): set async_steps=2 or leave it out")
        if self.sglang_ep_size < 1 or self.sglang_tp_size % self.sglang_ep_size:
            raise ConfigError(f"rollout.sglang_ep_size={self.sglang_ep_size} must divide rollout.sglang_tp_size="
                              f"{self.sglang_tp_size} (SGLang splits each server's TP ranks into EP groups)")
        if self.backend not in BACKENDS:
            raise ConfigError(f"rollout.backend={self.backend!r}; use {backend_names()}")
        modes = ["auto", *weight_sync_modes()]
        if self.weight_sync not in modes:
            raise ConfigError(f"rollout.weight_sync={self.weight_sync!r}; use {', '.join(modes[:-1])} or {modes[-1]}")
        try:  # what this backend takes (urls, host, weight-sync modes): declared in rollout/backends.py
            BACKENDS[self.backend].check_config(self)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.rollout_nodes < 0:
            raise ConfigError(f"rollout.rollout_nodes={self.rollout_nodes}; use 0 or more nodes")
        if self.weight_sync_dir and BACKENDS[self.backend].weight_sync_mode_of(self) != "disk":
            raise ConfigError(f"rollout.weight_sync_dir is the folder of disk weight sync, and rollout.weight_sync="
                              f"{self.weight_sync} (backend {self.backend}) writes none; unset it or set "
                              f"rollout.weight_sync=disk")
        if not self.engine_wait_s > 0:
            raise ConfigError(f"rollout.engine_wait_s={self.engine_wait_s}; use a number of seconds > 0")
        if not self.weight_sync_timeout_s > 0:
            raise ConfigError(f"rollout.weight_sync_timeout_s={self.weight_sync_timeout_s}; use seconds > 0")
        if self.check_weight_sync < 0:
            raise ConfigError(f"rollout.check_weight_sync={self.check_weight_sync}; use 0 (off) or every N syncs")
        if self.check_weight_sync and not BACKENDS[self.backend].serves_weights_digest:
            raise ConfigError(f"rollout.check_weight_sync compares the engines' weights digest, which rollout.backend="
                              f"{self.backend} engines do not serve; use rollout.backend=embedded or set it to 0")
        supervision = {"health_interval_s": 5.0, "max_engine_restarts": 3, "restart_window_s": 3600.0}
        changed = [k for k, v in supervision.items() if getattr(self, k) != v]
        if changed and not BACKENDS[self.backend].supervises_engines:
            raise ConfigError(f"rollout.{changed[0]} bounds the restarts of engines this launch supervises, and "
                              f"rollout.backend={self.backend} restarts none; unset it or use "
                              f"rollout.backend=embedded_http")
        if not (self.health_interval_s > 0 and self.restart_window_s > 0 and self.max_engine_restarts >= 0):
            raise ConfigError("rollout.health_interval_s and rollout.restart_window_s must be > 0 s and "
                              "rollout.max_engine_restarts >= 0")
        if not self.weight_sync_bucket_mb > 0:
            raise ConfigError(f"rollout.weight_sync_bucket_mb={self.weight_sync_bucket_mb}; use a size > 0 (MB)")


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
    progress_interval_s: float = 30.0  # off a terminal: a rollout progress line per round or this often
    # Stop after the step whose generated response tokens (all generated groups, kept or filtered, counted since
    # step 1, across resumes) reach this many: a compute-matched budget (tools/ablation.py). 0 = no limit.
    max_generated_tokens: int = 0
    # Where each step's metrics go (train/trackers.py): tensorboard, jsonl (metrics.jsonl, always), wandb, mlflow.
    # trainer.tensorboard=false drops tensorboard from the list.
    loggers: list = field(default_factory=lambda: ["tensorboard", "jsonl"])
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    # Every N steps, every generated sample (kept or dropped) to run_dir/rollouts/ (train/rollout_dump.py); 0 = off
    dump_rollouts: int = 0

    def __post_init__(self):
        if self.max_generated_tokens < 0:
            raise ConfigError(f"trainer.max_generated_tokens={self.max_generated_tokens}; use 0 (no limit) or more")
        if self.dump_rollouts < 0:
            raise ConfigError(f"trainer.dump_rollouts={self.dump_rollouts}; use 0 (off) or a step interval")
        try:
            check_loggers(self.loggers)
        except ValueError as e:
            raise ConfigError(str(e)) from None


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
    overlong_buffer: OverlongConfig = field(default_factory=OverlongConfig)  # off unless enable: true
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def sampling(self) -> DynamicSamplingConfig:
        return DynamicSamplingConfig(rollout_batch_size=self.rollout.rollout_batch_size,
                                     n_samples_per_prompt=self.rollout.n_samples_per_prompt, **self.dynamic_sampling)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["rollout"].get("api_key"):
            d["rollout"]["api_key"] = "<redacted>"
        return d


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


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats: `1e-6`, `5e-7` and `1E3` are floats (YAML 1.1 wants `1.0e-6`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def load_yaml(text: str):
    """The one YAML reader of the config system (files and override values alike)."""
    return yaml.load(text, Loader=_Loader)


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
        value = str(value) if target is str and value not in ("null", "~", "") else _parse_raw(value, key)
    if value is None:
        return None
    if target is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if target in (int, float, str, bool) and not isinstance(value, target):
        raise ConfigError(f"{key}={value!r} must be of type {target.__name__}")
    return value


def _parse_raw(value: str, key: str):
    try:
        return load_yaml(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}={value}: not a valid value ({str(e).splitlines()[0]})") from None


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
            tree = load_yaml(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p} is not valid YAML: {' '.join(str(e).split())}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{p} is not UTF-8 text; give a YAML config file") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), _Raw(raw))
    return _build(Config, tree, "")


def validate(cfg: Config, world_size: Optional[int] = None) -> None:
    """Cross-section checks that no single section can make (and defaults that come from another section).

    Runs before any process starts (the CLI calls it with the world it is about to launch); each rule raises one
    ConfigError line naming the key and the fix.
    """
    from .parallel import check_sizes, check_supported, data_parallel_size, world_size_from_env

    try:
        cfg.sampling()
    except (ValueError, TypeError) as e:
        raise ConfigError(f"dynamic_sampling: {e}") from e
    if cfg.algorithm.rollout_correction.enabled and not cfg.actor.recompute_old_logprobs:
        raise ConfigError("algorithm.rollout_correction (or tis_cap) weighs trainer vs engine log-probs; with "
                          "actor.recompute_old_logprobs=false they are the same: set it true or turn the correction off")
    _check_async(cfg)
    if cfg.rollout.return_routed_experts and cfg.actor.routing_replay != "r3":
        raise ConfigError("rollout.return_routed_experts is set by actor.routing_replay=r3; remove it (or set "
                          "actor.routing_replay=r3)")
    cfg.rollout.return_routed_experts = cfg.actor.routing_replay == "r3"
    if cfg.rollout.multi_turn.enabled and cfg.rollout.return_routed_experts:
        raise ConfigError("rollout.multi_turn.enabled does not take actor.routing_replay=r3 (each turn's routed "
                          "experts are not joined); use actor.routing_replay=r2 or none")
    if not cfg.model.path:
        raise ConfigError("model.path is required: a Hugging Face model folder (config.json + safetensors)")
    if not (Path(cfg.model.path) / "config.json").is_file():
        raise ConfigError(f"model.path={cfg.model.path} has no config.json; point it at a Hugging Face model folder")
    if not cfg.data.path or not Path(cfg.data.path).is_file():
        raise ConfigError(f"data.path={cfg.data.path!r} is not a file; give a JSONL or Parquet prompt file")
    from .models.hf_config import arch_from_hf, check_parallel_sizes, load_hf_config, padded_vocab_size

    try:
        arch = arch_from_hf(load_hf_config(cfg.model.path))
        padded_vocab_size(arch.vocab_size, cfg.model.make_vocab_size_divisible_by)
    except ValueError as e:
        raise ConfigError(f"model.path={cfg.model.path}: {e}") from e
    if cfg.actor.routing_replay != "none" and arch.moe is None:
        raise ConfigError(f"actor.routing_replay={cfg.actor.routing_replay} replays MoE routing; model.path="
                          f"{cfg.model.path} has no experts: set actor.routing_replay=none")
    world = world_size or world_size_from_env()
    try:
        check_sizes(cfg.parallel, world)
        check_supported(cfg.parallel, num_experts=arch.moe.num_experts if arch.moe else 0)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    try:  # the model must fit the parallel layout before any process starts
        p = cfg.parallel
        check_parallel_sizes(arch, p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                             p.expert_model_parallel_size, p.expert_tensor_parallel_size)
        import torch

        from .models import moe

        moe.check_options(moe.options_of(cfg.model), arch.moe, on_gpu=torch.cuda.is_available())
    except ValueError as e:
        raise ConfigError(f"model.path={cfg.model.path}: {e}") from e
    _check_batch_sizes(cfg, data_parallel_size(cfg.parallel, world))
    _check_lengths(cfg, arch.max_position_embeddings)
    if cfg.algorithm.loss_scale_factor is None:  # Dr. GRPO's constant divisor is the generation budget
        cfg.algorithm.loss_scale_factor = cfg.rollout.max_response_length
    if cfg.eval.path and not Path(cfg.eval.path).is_file():
        raise ConfigError(f"eval.path={cfg.eval.path} is not a file")
    if cfg.trainer.load:
        load = Path(cfg.trainer.load)
        if not ((load / "latest").is_file() or (load / "model").is_dir() or any(load.glob("iter_*"))):
            raise ConfigError(f"trainer.load={load} holds no checkpoint (no `latest` file or model/ folder)")


def _check_async(cfg: Config) -> None:
    r = cfg.rollout
    if not r.async_steps:
        return
    if r.async_steps >= 2 and cfg.sampling().on_exhausted == "skip":
        raise ConfigError(f"dynamic_sampling.on_exhausted=skip trains no update at a skipped step, so versions would "
                          f"fall behind steps with rollout.async_steps={r.async_steps}: use on_exhausted=train or pad")
    if r.async_steps == 1 and cfg.sampling().keep_partial:
        raise ConfigError("dynamic_sampling.keep_partial carries surplus groups one more weight version behind; with "
                          "rollout.async_steps=1 they would be two behind: set keep_partial=false")
    if r.async_steps >= 2 and cfg.sampling().keep_partial:
        raise ConfigError(f"dynamic_sampling.keep_partial: rollout.async_steps={r.async_steps} always carries surplus "
                          "groups to the next step, held to the staleness bound: leave keep_partial out")
    import torch

    # on CPU nothing is released (no memory saver): a colocated server keeps generating while the actor trains
    if r.colocate and BACKENDS[r.backend].releases_memory_when_colocated and torch.cuda.is_available():
        raise ConfigError(f"rollout.async_steps={r.async_steps} generates while the actor trains, but colocated "
                          "engines release their GPUs then: set rollout.colocate=false (engines on GPUs of their own) "
                          "or async_steps=0")
    if r.async_steps == 1 and cfg.trainer.save_interval == 1:
        raise ConfigError("rollout.async_steps=1 drains the rollout before every checkpoint, so with "
                          "trainer.save_interval=1 no rollout overlaps training: save less often or use async_steps=0")


def _check_batch_sizes(cfg: Config, dp: int) -> None:
    r, a = cfg.rollout, cfg.actor
    for key, value in (("rollout.rollout_batch_size", r.rollout_batch_size),
                       ("rollout.n_samples_per_prompt", r.n_samples_per_prompt),
                       ("actor.global_batch_size", a.global_batch_size),
                       ("actor.micro_batch_size", a.micro_batch_size)):
        if value < 1:
            raise ConfigError(f"{key}={value} must be >= 1")
    responses = r.rollout_batch_size * r.n_samples_per_prompt
    if responses % a.global_batch_size:
        raise ConfigError(
            f"rollout.rollout_batch_size x rollout.n_samples_per_prompt = {responses} responses per step is not a "
            f"multiple of actor.global_batch_size={a.global_batch_size}")
    if a.global_batch_size % (a.micro_batch_size * dp):
        raise ConfigError(
            f"actor.global_batch_size={a.global_batch_size} must be a multiple of actor.micro_batch_size "
            f"({a.micro_batch_size}) x data-parallel size ({dp})")


def _check_lengths(cfg: Config, max_positions: int) -> None:
    r, e, o = cfg.rollout, cfg.eval, cfg.overlong_buffer
    prompt = cfg.data.max_prompt_length or 0
    for key, value in (("rollout.max_response_length", r.max_response_length),
                       ("eval.max_response_length", e.max_response_length)):
        if value is None:
            continue
        if value < 1:
            raise ConfigError(f"{key}={value} must be >= 1")
        if prompt + value > max_positions:
            raise ConfigError(f"data.max_prompt_length ({prompt}) + {key} ({value}) exceeds the model's "
                              f"max_position_embeddings={max_positions}; shorten one of them")
    if e.n_samples < 1:
        raise ConfigError(f"eval.n_samples={e.n_samples} must be >= 1")
    if o.enable and o.len > r.max_response_length:
        raise ConfigError(f"overlong_buffer.len={o.len} exceeds rollout.max_response_length={r.max_response_length}: "
                          f"the buffer lies inside the response budget; lower overlong_buffer.len")
