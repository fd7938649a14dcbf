"""A user's reward endpoint over HTTP, batched, with a timeout and retries with exponential backoff.

Protocol: POST `{"items": [{"prompt", "response", "label", "data_source"}, ...]}` to `reward.remote_url`;
the endpoint answers `{"scores": [s_0, s_1, ...]}` (or a bare list), one bool or number per item,
in order. A number counts as correct when > 0. After the last retry a batch scores wrong with
status `timeout` or `error`; nothing raises.
"""
import asyncio
import logging
from typing import Sequence

import aiohttp

from dapo_megatron.reward.registry import register_verifier
from dapo_megatron.types import VerifyResult, as_correct

logger = logging.getLogger(__name__)


class _Retryable(Exception):
    pass


def parse_scores(body, n: int) -> list[VerifyResult]:
    scores = body.get("scores") if isinstance(body, dict) else body
    if not isinstance(scores, list) or len(scores) != n:
        raise ValueError(f"expected {{\"scores\": [...]}} with {n} entries, got {str(body)[:200]}")
    return [VerifyResult(as_correct(s), score=float(s)) for s in scores]


class RemoteRewardClient:
    def __init__(self, url: str, batch_size: int = 64, timeout_s: float = 60.0, max_retries: int = 3,
                 backoff_s: float = 0.5):
        self.url = url
        self.batch_size = batch_size
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.max_retries = max_retries
        self.backoff_s = backoff_s

    @classmethod
    def from_config(cls, cfg) -> "RemoteRewardClient":
        return cls(cfg.remote_url, cfg.remote_batch_size, cfg.remote_timeout_s, cfg.remote_max_retries,
                   cfg.remote_backoff_s)

    async def score(self, items: Sequence[dict]) -> list[VerifyResult]:
        batches = [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        async with aiohttp.ClientSession(timeout=self.timeout) as session:
            done = await asyncio.gather(*(self._post_batch(session, b) for b in batches))
        return [r for batch in done for r in batch]

    async def _post_batch(self, session, batch: Sequence[dict]) -> list[VerifyResult]:
        status, reason = "error", ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                return await self._post_once(session, batch)
            except asyncio.TimeoutError:
                status, reason = "timeout", f"no answer within {self.timeout.total}s"
            except (_Retryable, aiohttp.ClientError) as e:
                status, reason = "error", f"{type(e).__name__}: {e}"
            except (ValueError, TypeError) as e:  # a malformed answer will not improve on retry
                status, reason = "error", f"bad response from {self.url}: {e}"
                break
        logger.warning("reward: remote batch of %d scored wrong after %d attempt(s): %s",
                       len(batch), attempt + 1, reason)
        return [VerifyResult(False, status, reason) for _ in batch]

    async def _post_once(self, session, batch) -> list[VerifyResult]:
        async with session.post(self.url, json={"items": list(batch)}) as resp:
            if resp.status == 429 or resp.status >= 500:
                raise _Retryable(f"HTTP {resp.status}")
            if resp.status >= 400:
                raise ValueError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
            return parse_scores(await resp.json(content_type=None), len(batch))


@register_verifier("remote", needs_config=True)
class RemoteVerifier:
    """The remote endpoint as a plain `(response, ground_truth) -> bool` verifier (one request per call)."""

    def __init__(self, cfg):
        self.client = RemoteRewardClient.from_config(cfg)

    def __call__(self, response: str, ground_truth: str) -> bool:
        item = {"prompt": "", "response": response, "label": ground_truth, "data_source": ""}
        result = asyncio.run(self.client.score([item]))[0]
        if result.status != "ok":
            raise RuntimeError(f"remote verifier {self.client.url}: {result.error}")
        return result.correct
