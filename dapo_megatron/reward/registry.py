"""`reward.type` -> verifier function `(response, ground_truth) -> bool`, from one registry.

A verifier registers itself where it is defined, declaring what the worker pool does for it:

    @register_verifier("gsm8k", warm_up=("#### 42", "42"))
    def verify(response: str, ground_truth: str) -> bool: ...

`preload`: modules the pool's forkserver imports once, so that (re)started workers pay no import time (the verifier's
own module always is); `warm_up`: one `(response, ground_truth)` call each worker makes before its per-call timeout
starts (first calls compile regexes and grammars), or None; `needs_config`: the registered object is built from the
RewardConfig (`remote`: the endpoint's settings). Every module of this package is imported on the first lookup, so a
new verifier module here needs no other edit: validation (reward/config.py), error messages, preloading and warm-up
all read `VERIFIERS`. A verifier outside the package is named `python:module.function`.
"""
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable, Optional

from dapo_megatron.types import as_correct  # noqa: F401 (re-exported)

Verifier = Callable[[str, str], bool]


@dataclass(frozen=True)
class VerifierSpec:
    fn: Callable
    preload: tuple = ()
    warm_up: Optional[tuple] = None
    needs_config: bool = False


VERIFIERS: dict = {}  # reward.type -> VerifierSpec, filled by @register_verifier
_PACKAGE = __name__.rpartition(".")[0]


def register_verifier(name: str, *, preload: tuple = (), warm_up: Optional[tuple] = None,
                      needs_config: bool = False):
    def wrap(fn):
        VERIFIERS[name] = VerifierSpec(fn, tuple(preload), warm_up, needs_config)
        return fn
    return wrap


def _package_modules() -> list:
    package = importlib.import_module(_PACKAGE)
    return [f"{_PACKAGE}.{m.name}" for m in pkgutil.iter_modules(package.__path__)]


def _load_all() -> dict:
    for module in _package_modules():  # each registers what it defines; imported modules cost nothing
        importlib.import_module(module)
    return VERIFIERS


def verifier_names() -> list:
    """The registered `reward.type` names, sorted."""
    return sorted(_load_all())


def preload_modules() -> list:
    """What the forkserver imports once: the registry, each pooled verifier's module and its declared `preload`.
    `__main__` (the documented idiom) stops every worker from re-running the trainer script's imports."""
    pooled = [spec for spec in _load_all().values() if not spec.needs_config]
    return list(dict.fromkeys(["__main__", __name__, *(s.fn.__module__ for s in pooled),
                               *(m for s in pooled for m in s.preload)]))


def get_verifier(type: str, cfg=None) -> Verifier:
    """The verifier named by `reward.type`: a registered name or `python:module.function`."""
    spec = VERIFIERS.get(type) or _load_all().get(type)
    if spec is not None and spec.needs_config:
        if cfg is None:
            raise ValueError(f"reward.type={type} needs the RewardConfig to build its verifier")
        return spec.fn(cfg)
    if spec is not None:
        return spec.fn
    if type.startswith("python:"):
        return _import_function(type[len("python:"):])
    raise ValueError(f"reward.type={type!r} is unknown; use one of {', '.join(verifier_names())} or "
                     f"python:module.function")


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
    """The verifier's declared warm-up call, if any, before the per-call timeout starts."""
    spec = VERIFIERS.get(type)
    if spec is not None and spec.warm_up is not None and fn is not None:
        fn(*spec.warm_up)
