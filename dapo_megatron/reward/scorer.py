"""Score samples: fill `correct`, `score` (1.0/0.0) and `reward` (correct_reward / wrong_reward)."""
import asyncio
import threading
from typing import Sequence

from dapo_megatron.reward.config import RewardConfig
from dapo_megatron.reward.pool import VerifierPool, VerifyResult
from dapo_megatron.reward.remote import RemoteRewardClient
from dapo_megatron.types import Sample


class RewardScorer:
    """Verifies responses in a process pool (or at a remote endpoint); never raises on a bad response.

    Timeouts and verifier exceptions score wrong and are counted in `reward/timeouts` and `reward/errors`
    (per call) and in `self.totals` (over the run).
    """

    def __init__(self, cfg: RewardConfig):
        self.cfg = cfg
        self.totals = {"count": 0, "correct": 0, "timeouts": 0, "errors": 0}
        if cfg.type == "remote":
            self._remote, self._pool = RemoteRewardClient.from_config(cfg), None
        else:
            self._remote = None
            self._pool = VerifierPool(cfg.type, cfg.num_workers, cfg.timeout_s, cfg.start_method)

    def score_samples(self, samples: Sequence[Sample]) -> dict:
        if self._pool is not None:
            return self._apply(samples, self._pool.map(_pairs(samples)))
        return self._apply(samples, _run_coroutine(self._remote.score(_items(samples))))

    async def ascore_samples(self, samples: Sequence[Sample]) -> dict:
        if self._pool is not None and self.cfg.num_workers == 0:
            # In-process (debug) mode runs inline: no thread hop, so a scripted rollout stays deterministic.
            results = self._pool.map(_pairs(samples))
        elif self._pool is not None:  # the pool blocks on pipes: keep the event loop free
            results = await asyncio.to_thread(self._pool.map, _pairs(samples))
        else:
            results = await self._remote.score(_items(samples))
        return self._apply(samples, results)

    def _apply(self, samples: Sequence[Sample], results: Sequence[VerifyResult]) -> dict:
        raw = self.cfg.type == "remote" and self.cfg.remote_use_raw_score
        for s, r in zip(samples, results):
            s.correct = r.correct
            s.score = 1.0 if r.correct else 0.0
            s.reward = self.cfg.correct_reward if r.correct else self.cfg.wrong_reward
            if raw and r.score is not None:
                s.reward = r.score
            if r.status != "ok":
                s.metadata["reward_status"] = r.status
                s.metadata["reward_error"] = r.error
        counts = {
            "count": len(results),
            "correct": sum(r.correct for r in results),
            "timeouts": sum(r.status == "timeout" for r in results),
            "errors": sum(r.status == "error" for r in results),
        }
        for k, v in counts.items():
            self.totals[k] += v
        return {
            "reward/count": counts["count"],
            "reward/accuracy": counts["correct"] / max(1, counts["count"]),
            "reward/mean": sum(s.reward for s in samples) / max(1, len(samples)),
            "reward/timeouts": counts["timeouts"],
            "reward/errors": counts["errors"],
        }

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _pairs(samples: Sequence[Sample]) -> list[tuple[str, object]]:
    return [(s.response_text, s.label) for s in samples]


def _items(samples: Sequence[Sample]) -> list[dict]:
    return [{"prompt": s.prompt_text, "response": s.response_text,
             "label": None if s.label is None else str(s.label),
             "data_source": str(s.metadata.get("data_source", ""))} for s in samples]


def _run_coroutine(coro):
    """Run a coroutine from sync code, also when the caller already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("r", asyncio.run(coro)))
    thread.start()
    thread.join()
    return out["r"]
