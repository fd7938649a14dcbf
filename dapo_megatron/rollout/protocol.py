"""What the trainer needs from a fleet of rollout engines, declared once (docs/ARCHITECTURE.md: "Rollout").

The trainer side (train/stages.py, rollout/weight_sync.py, train/sync_check.py) talks to engines only through
`RolloutFleet` and to the backend that built it (rollout/backends.py: `RolloutBackend`). `RolloutClient`
(rollout/client.py) implements it over SGLang's HTTP API, and for the embedded engine in-process through the same
code (`RolloutClient(engine=...)`); a new engine implements it in its own module and registers a backend. Engine
parameter names (SGLang's `max_new_tokens`, `sampling_seed`, endpoints) live behind it.

Imports nothing heavy: a backend module or a test can implement it without torch or aiohttp.
"""
from dataclasses import dataclass
from typing import ContextManager, Optional, Protocol, runtime_checkable


@dataclass(frozen=True)
class GenerationParams:
    """How to sample one group, in our words; each client maps them to its engine's names."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: no top-k filtering
    max_tokens: int = 1024  # response budget (SGLang: max_new_tokens)
    seed: Optional[int] = None  # per-request sampling seed (SGLang: sampling_seed); None: the engine's own
    stop: tuple = ()  # stop strings (multi-turn tool calls); the sampled ids keep the tokens that completed one


@runtime_checkable
class RolloutFleet(Protocol):
    """A fleet of engines serving one model's weights, as the trainer uses it.

    Contract (token-exact, versioned): `generate_group` fills each prompt-only `Sample` of one group (same
    `prompt_ids`) with the engine's own `response_ids`, one `rollout_logprobs` entry per response token (the sampled
    token's log-prob under the engine's weights), `finish_reason` ("stop", "length" or "abort"), `response_text` (for
    the verifier only, never re-tokenised) and `weight_version` (the version that generated it). A call is answered or
    raises a `RolloutError` (rollout/client.py): samples are never silently lost.
    """

    worker_urls: list  # one address per engine worker (distributed weight sync, debug digests); may be symbolic

    async def generate_group(self, samples: list, params: GenerationParams) -> list:
        """Sample `len(samples)` responses of one prompt; fills and returns `samples`."""

    async def abort_all(self) -> None:
        """Abort in-flight and queued requests; they return promptly with finish_reason "abort"."""

    async def pause(self) -> None:
        """Stop generating (in-flight requests are aborted) until `resume`."""

    async def resume(self) -> None:
        """Generate again after `pause`."""

    def weight_update_session(self) -> ContextManager:
        """Synchronous context around tensor / distributed loads: pauses and opens the engines' update session;
        on leaving closes it (also after a failure), drops cached prefixes of the old weights after a complete update,
        and resumes."""

    async def update_weights_from_disk(self, model_path: str, *, weight_version=None, timeout_s=None) -> list:
        """Every engine loads the Hugging Face checkpoint folder `model_path` and reports `weight_version`.
        `timeout_s` (each update call below takes it: rollout.weight_sync_timeout_s): an engine that does not answer
        in time raises RolloutTimeoutError naming it."""

    async def update_weights_from_tensor(self, payload: dict, timeout_s=None) -> list:
        """One bucket of tensors (in the backend's own tensor-update request) to every engine."""

    async def init_weights_update_group(self, payloads: list, timeout_s=None) -> list:
        """Distributed update: every engine joins the sender's process group (one payload per engine worker)."""

    async def update_weights_from_distributed(self, payload: dict, timeout_s=None) -> list:
        """Distributed update: every engine receives one broadcast bucket (names, dtypes, shapes, version)."""

    async def destroy_weights_update_group(self, group_name: str) -> list:
        """Distributed update: every engine leaves the group."""

    async def wait_healthy(self, timeout_s: float = 300.0) -> list:
        """Wait until every engine answers; raises if one does not within `timeout_s`."""

    async def weights_digest(self) -> list:
        """The sync's equality check (train/sync_check.py, rollout.check_weight_sync): each engine's {HF name:
        digest} of its weights; only backends that declare `serves_weights_digest`."""

    async def close(self) -> None:
        """Release what the client holds."""
