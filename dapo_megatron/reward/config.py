"""The `reward:` config section."""
import sys
from dataclasses import dataclass
from typing import Optional

START_METHODS = ("forkserver", "spawn", "fork")


def default_start_method() -> str:
    # forkserver: workers fork from a clean server process, never from the trainer (whose CUDA context and
    # NCCL/OpenMP threads make a plain fork unsafe), and, unlike spawn, a replacement worker starts in
    # milliseconds because the server has the verifier modules preloaded.
    return "spawn" if sys.platform == "win32" else "forkserver"


@dataclass
class RewardConfig:
    """How responses are scored. `type`: math_dapo | math_verify | gsm8k | remote | python:module.function."""

    type: str = "math_dapo"
    num_workers: int = 2  # verifier processes; 0 runs in-process (no timeout; for debugging)
    timeout_s: float = 5.0  # per response; a timed-out worker is killed and replaced, the response scores wrong
    correct_reward: float = 1.0
    wrong_reward: float = -1.0  # DAPO uses +1/-1; set 0.0 for the 1/0 convention
    start_method: Optional[str] = None  # None = forkserver (POSIX) / spawn (Windows)
    remote_url: Optional[str] = None  # POST endpoint for type=remote
    remote_batch_size: int = 64
    remote_timeout_s: float = 60.0  # per HTTP request
    remote_max_retries: int = 3
    remote_backoff_s: float = 0.5  # doubled after each failed attempt
    remote_use_raw_score: bool = False  # reward = the endpoint's number instead of correct/wrong_reward

    def __post_init__(self):
        from dapo_megatron.reward.registry import verifier_names  # the verifiers register there

        if self.type not in verifier_names() and not self.type.startswith("python:"):
            raise ValueError(f"reward.type={self.type!r} is unknown; use one of {', '.join(verifier_names())} "
                             "or python:module.function")
        if self.type == "remote" and not self.remote_url:
            raise ValueError("reward.type=remote needs reward.remote_url (the endpoint to POST to)")
        if self.num_workers < 0:
            raise ValueError(f"reward.num_workers={self.num_workers} must be >= 0 (0 = in-process)")
        if self.timeout_s <= 0 or self.remote_timeout_s <= 0:
            raise ValueError("reward.timeout_s and reward.remote_timeout_s must be > 0")
        if self.remote_batch_size < 1 or self.remote_max_retries < 0:
            raise ValueError("reward.remote_batch_size must be >= 1 and reward.remote_max_retries >= 0")
        if self.start_method is not None and self.start_method not in START_METHODS:
            raise ValueError(f"reward.start_method={self.start_method!r}; use one of {START_METHODS} or null")
