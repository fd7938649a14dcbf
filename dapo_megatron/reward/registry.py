"""`reward.type` -> verifier function `(response, ground_truth) -> bool`."""
import importlib
from typing import Callable, Optional

from dapo_megatron.types import as_correct  # noqa: F401 (re-exported)

Verifier = Callable[[str, str], bool]

BUILTIN_VERIFIERS = {
    "math_dapo": ("dapo_megatron.reward.math_dapo", "verify"),
    "math_verify": ("dapo_megatron.reward.math_verify_reward", "verify"),
    "gsm8k": ("dapo_megatron.reward.gsm8k", "verify"),
}
# Imported by the forkserver once so that (re)started workers need no import time. `__main__` (the
# documented idiom) stops every worker from re-running the trainer script's imports.
PRELOAD_MODULES = ["__main__", "dapo_megatron.reward.registry", "dapo_megatron.reward.math_dapo",
                   "dapo_megatron.reward.math_verify_reward", "dapo_megatron.reward.gsm8k", "math_verify"]


def get_verifier(type: str, cfg=None) -> Verifier:
    """The verifier named by `reward.type`: a built-in name, `remote`, or `python:module.function`."""
    if type in BUILTIN_VERIFIERS:
        module, name = BUILTIN_VERIFIERS[type]
        return getattr(importlib.import_module(module), name)
    if type == "remote":
        from dapo_megatron.reward.remote import RemoteVerifier

        if cfg is None:
            raise ValueError("reward.type=remote needs the RewardConfig (remote_url) to build its verifier")
        return RemoteVerifier(cfg)
    if type.startswith("python:"):
        return _import_function(type[len("python:"):])
    raise ValueError(f"reward.type={type!r} is unknown; use one of "
                     f"{', '.join([*BUILTIN_VERIFIERS, 'remote'])} or python:module.function")


def _import_function(path: str) -> Verifier:
    module_name, _, attr = path.replace(":", ".").rpartition(".")
    if not module_name:
        raise ValueError(f"reward.type=python:{path} must name module.function, e.g. python:my_pkg.rewards.check")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward.type=python:{path}: cannot import {module_name!r} ({e}); "
                         "is it on PYTHONPATH?") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward.type=python:{path}: {module_name!r} has no function {attr!r}")
    return fn


def warm_up(type: str, fn: Optional[Verifier]) -> None:
    """First calls compile regexes and sympy grammars; pay that before the per-call timeout starts."""
    if type in BUILTIN_VERIFIERS and fn is not None:
        fn("\\boxed{\\frac{1}{2}}", "0.5")
