"""Types shared by rollout, reward/filter and the trainer (docs/ARCHITECTURE.md, "Contracts": token-exact samples,
weight versions). Imports nothing of the package."""
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class Sample:
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    # Log-probs of response_ids under the policy that generated them (the engine's "old" policy).
    rollout_logprobs: list[float] = field(default_factory=list)
    finish_reason: str = "stop"  # stop | length | abort
    group_id: int = 0  # index of the prompt group this response belongs to
    index: int = 0  # position of the response inside its group
    label: Any = None  # ground truth passed to the verifier
    prompt_text: str = ""
    response_text: str = ""
    score: float = 0.0  # raw verifier output (e.g. 1.0 / 0.0 correct)
    reward: float = 0.0  # score mapped to the reward convention, plus overlong shaping
    correct: Optional[bool] = None
    loss_mask: Optional[list[int]] = None  # per response token; None means all ones
    weight_version: int = 0  # version of the engine weights that produced the response's first (oldest) token
    # rollout.partial_rollout: the version that sampled each response token, when a weight update happened during
    # generation (its log-prob in rollout_logprobs is under that version); None: every token is `weight_version`
    weight_versions: Optional[list[int]] = None
    # MoE: the experts the engine routed each token to, SGLang's `meta_info.routed_experts` as it came (base64 of
    # int32 [len(prompt_ids) + len(response_ids) - 1, num_hidden_layers, num_experts_per_tok]); None unless
    # actor.routing_replay=r3 asked the engine for it (train/routing_replay.py replays it)
    routed_experts: Optional[str] = None
    metadata: dict = field(default_factory=dict)

    @property
    def response_length(self) -> int:
        return len(self.response_ids)

    def token_versions(self) -> list[int]:
        """The weight version of each response token."""
        return list(self.weight_versions) if self.weight_versions is not None else \
            [self.weight_version] * len(self.response_ids)

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_state_dict(cls, d: dict) -> "Sample":
        return cls(**d)


@dataclass
class VerifyResult:
    """One verifier call's outcome (reward pool, remote verifier)."""
    correct: bool
    status: str = "ok"  # ok | timeout | error
    error: str = ""
    score: Optional[float] = None  # a raw number from the verifier, when it gave one


def as_correct(value) -> bool:
    """A verifier's return value as correct/wrong: a bool, or a number that counts as correct when > 0."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return value > 0
    raise TypeError(f"verifier returned {type(value).__name__} {value!r}; expected bool or a number")


class WeightVersion:
    """The trainer side's one count of weight versions pushed to the engines (0 = model.path's weights).

    The rollout backend owns it; the client reads it as the default version of a sample whose server did not
    report one, weight sync reads it for the version it pushes, and only `advance()` / `set()` change it."""

    def __init__(self, value: int = 0):
        self.value = int(value)

    def set(self, value: int) -> int:
        self.value = int(value)
        return self.value

    def __int__(self) -> int:
        return self.value

    def __repr__(self) -> str:
        return f"WeightVersion({self.value})"
