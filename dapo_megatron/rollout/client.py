"""Async client of SGLang's native HTTP API, or of the embedded engine in-process through the same code.

    client = RolloutClient(["http://127.0.0.1:30000"])       # SGLang servers, or one router URL
    client = RolloutClient(engine=Engine(model_dir))         # in-process, no HTTP
    outs = await client.generate(prompt_ids, {"temperature": 1.0, "max_new_tokens": 512, "n": 8})
    group = await client.generate_group(samples, GenerationParams(temperature=1.0, max_tokens=512))

It implements the trainer's engine interface (rollout/protocol.py: `RolloutFleet`); SGLang's endpoint and
sampling-parameter names stay in this module.

`generate_group` sends one request with `n = len(samples)`: the prompt is prefilled once and all samples of a group
share a server (and its prefix cache). The response tokens and log-probs are read from
`meta_info.output_token_logprobs` (as slime does), so they include a matched EOS token.

Failure handling: at most `max_concurrency` requests in flight; each has `request_timeout_s`. A connection error
(server down, or dying mid-request) marks that server down for a while and retries the whole request on the
least-loaded other server, with exponential backoff, up to `max_retries` times; then `RolloutServerError` names the
URLs and causes. HTTP 400 raises `RolloutRequestError` (not retried), a timeout `RolloutTimeoutError` (the request is
aborted on its server). A request is answered or raises: samples are never silently lost.

`abort_all()` aborts in-flight requests on every server (`/abort_request` abort_all); they, and calls still waiting
for a concurrency slot or a retry, return promptly with finish_reason "abort".

Control calls (weights, cache, pause, memory) fan out to every worker (`worker_urls`: with a router in front, the
workers behind it). The client works from any event loop, including a new one per `asyncio.run`.
"""
import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from typing import Optional

from ..types import WeightVersion
from .protocol import GenerationParams

log = logging.getLogger(__name__)

_DOWN_FOR_S = 5.0  # a server that failed a connection is skipped this long while others are up


class RolloutError(RuntimeError):
    """Base class of rollout client errors."""


class RolloutServerError(RolloutError):
    """A server could not be reached, died mid-request, or answered 5xx."""


class RolloutRequestError(RolloutError):
    """A server rejected the request (HTTP 4xx): fix the request."""


class RolloutTimeoutError(RolloutError):
    """No answer within request_timeout_s."""


class EnginesLost(RolloutError):
    """The run's engines are gone for good (supervised ones past their restart bound, external ones that did not come
    back): the trainer checkpoints its last finished step, then stops in one line (train/loop.py)."""


@dataclass
class _Server:
    url: str
    in_flight: int = 0
    down_until: float = 0.0


def run_sync(coro):
    """Run a coroutine to completion from synchronous code, also when this thread already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def sglang_sampling_params(params: GenerationParams) -> dict:
    """Our GenerationParams in SGLang's sampling_params names (the embedded server takes the same)."""
    out = {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
           "max_new_tokens": params.max_tokens}
    if params.seed is not None:
        out["sampling_seed"] = params.seed
    if params.stop:
        out["stop"] = list(params.stop)
    return out


@contextlib.contextmanager
def update_session(client):
    """SGLang's weight-update session around tensor / distributed loads: pause (`client.sync_pause_mode`: abort
    in-flight requests; retract with rollout.partial_rollout),
    /begin_weight_update; on leaving /end_weight_update (also after a failed bucket, so the next sync can open one),
    then flush the cache (only after a complete update) and continue generation."""
    run_sync(client.pause_generation(client.sync_pause_mode))
    try:
        run_sync(client.begin_weight_update())
        try:
            yield
        finally:
            run_sync(client.end_weight_update())
        run_sync(client.flush_cache())
    finally:
        run_sync(client.continue_generation())


def _aborted(n: int, rid: str, prompt_tokens: int, version) -> list:
    meta = {"id": rid, "prompt_tokens": prompt_tokens, "completion_tokens": 0, "output_token_logprobs": [],
            "finish_reason": {"type": "abort", "message": "aborted by the client before it was sent"},
            "weight_version": version}
    return [{"text": "", "output_ids": [], "meta_info": dict(meta)} for _ in range(n)]


def _error_message(body) -> str:
    if isinstance(body, dict):
        return str(body.get("message") or body.get("error") or body)
    return str(body)[:2000]


class RolloutClient:
    def __init__(self, urls: Optional[list] = None, *, engine=None, worker_urls: Optional[list] = None,
                 max_concurrency: int = 64, request_timeout_s: float = 600.0, max_retries: int = 3,
                 backoff_s: float = 0.5, connect_timeout_s: float = 10.0, weight_version=None,
                 api_key: Optional[str] = None, return_routed_experts: bool = False):
        if (not urls) == (engine is None):
            raise ValueError("RolloutClient needs either urls (SGLang / embedded HTTP servers) or engine= "
                             "(in-process), not both")
        self.engine = engine
        self.urls = [u.rstrip("/") for u in urls] if urls else ["inprocess://engine"]
        self.worker_urls = [u.rstrip("/") for u in worker_urls] if worker_urls else list(self.urls)
        self._servers = {u: _Server(u) for u in self.urls}
        self.max_concurrency, self.request_timeout_s = max_concurrency, request_timeout_s
        self.max_retries, self.backoff_s, self.connect_timeout_s = max_retries, backoff_s, connect_timeout_s
        # Read-only here: the rollout backend owns the version (a samples' default when a server reports none).
        self.version = weight_version if weight_version is not None else WeightVersion()
        # SGLang's --api-key: sent as `Authorization: Bearer <key>` on every request (never logged).
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._abort_epoch = 0
        # how a weight-update session pauses generation: abort (in-flight requests return finish_reason abort), or
        # retract / in_place (rollout.partial_rollout: they continue with the new weights after the update)
        self.sync_pause_mode = "abort"
        # R3 routing replay: ask for SGLang's meta_info.routed_experts and keep it on the Sample
        self.return_routed_experts = return_routed_experts
        self._rr = itertools.count()
        # Engines this launch started, watched and restarted (rollout/supervisor.py: EngineSupervisor): a request
        # lost to a dead or hung engine waits for it (bounded) and is generated again; only answers of the current
        # weight version are taken.
        self.supervisor = None
        # Engines this process does not restart (rollout.backend=http, or another node's `dapo-megatron engines`):
        # with every one down, how long to wait for one to answer /health again (rollout.engine_wait_s), and
        # `catch_up()`, which gives one back the current weights (RolloutBackend.wait_for_unowned_engines)
        # `reached`: an engine answered once (a generate, or the start-up's wait for /health): before that, a URL that
        # does not answer is a wrong one, which fails fast instead of being waited for
        self.external_wait_s, self.catch_up, self.reached = None, None, False
        self._semaphores = weakref.WeakKeyDictionary()  # one per event loop
        self._external_lock = threading.Lock()

    # ------------------------------------------------------------------ transport
    async def _call(self, url: str, path: str, payload: Optional[dict] = None, *, timeout_s: Optional[float] = None,
                    method: str = "POST") -> tuple:
        """One request; returns (status, body). Raises aiohttp/OS connection errors and asyncio.TimeoutError."""
        if self.engine is not None:
            from .server import dispatch

            return await asyncio.wait_for(dispatch(self.engine, path, payload), timeout_s)
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=self.connect_timeout_s)
        # A session per call: the client stays usable from any event loop (the trainer may run several).
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.request(method, url + path, json=payload, headers=self._headers) as resp:
                if resp.content_type == "application/json":
                    return resp.status, await resp.json()
                return resp.status, await resp.text()

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if loop not in self._semaphores:
            self._semaphores[loop] = asyncio.Semaphore(self.max_concurrency)
        return self._semaphores[loop]

    def _pick(self, tried: set) -> _Server:
        """Least-loaded server that is up and not yet tried; round-robin among equals."""
        now, servers = time.monotonic(), list(self._servers.values())
        for pool in ([s for s in servers if s.url not in tried and s.down_until <= now],
                     [s for s in servers if s.down_until <= now], servers):
            if pool:
                least = min(s.in_flight for s in pool)
                ties = [s for s in pool if s.in_flight == least]
                return ties[next(self._rr) % len(ties)]

    # ------------------------------------------------------------------ generation
    async def generate(self, input_ids: list, sampling_params: dict, *, rid: Optional[str] = None,
                       return_logprob: bool = True) -> list:
        """POST /generate for one prompt; returns the list of n SGLang output dicts."""
        epoch, rid = self._abort_epoch, rid or uuid.uuid4().hex
        n = int((sampling_params or {}).get("n") or 1)
        payload = {"input_ids": list(input_ids), "sampling_params": dict(sampling_params or {}), "rid": rid,
                   "return_logprob": return_logprob}
        if self.return_routed_experts:
            payload["return_routed_experts"] = True
        async with self._semaphore():
            if epoch != self._abort_epoch:
                return _aborted(n, rid, len(input_ids), self.weight_version)
            return await self._generate_with_retries(payload, n, epoch)

    async def _generate_with_retries(self, payload: dict, n: int, epoch: int) -> list:
        tried, errors = set(), []
        for attempt in range(self.max_retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            if epoch != self._abort_epoch:
                return _aborted(n, payload["rid"], len(payload["input_ids"]), self.weight_version)
            server = self._pick(tried)
            tried.add(server.url)
            if server.down_until <= time.monotonic():
                pass
            elif self._supervises(server.url):  # every engine down, this one ours: wait until it is restarted
                await self.supervisor.wait_up(server.url, self.request_timeout_s)
                server.down_until = 0.0
            elif self.external_wait_s and self.reached:
                # every engine down, this one not restarted by us (someone else's, or another node's `dapo-megatron
                # engines`), after one answered (a wrong URL from the start fails fast): wait, bounded
                server = self._servers[await asyncio.to_thread(self.wait_external, errors)]
            server.in_flight += 1
            try:
                status, body = await self._call(server.url, "/generate", payload, timeout_s=self.request_timeout_s)
            except _connection_errors() as e:  # server down or died mid-request: retry elsewhere
                server.down_until = time.monotonic() + _DOWN_FOR_S
                if self._supervises(server.url):  # ours: restarted if its process died; retried once back
                    self.supervisor.suspect(server.url)
                errors.append(f"{server.url}: {e!r}")
                log.warning("generate on %s failed (%r); attempt %d/%d", server.url, e, attempt + 1,
                            self.max_retries + 1)
                continue
            except asyncio.TimeoutError:
                await self._abort_quietly(server.url, payload["rid"])
                if self.supervisor is not None:  # a hung engine: restarted, the request generated again
                    server.down_until = time.monotonic() + _DOWN_FOR_S
                    errors.append(f"{server.url}: no answer within request_timeout_s={self.request_timeout_s}s")
                    await asyncio.to_thread(self.supervisor.report_hung, server.url)
                    continue
                raise RolloutTimeoutError(f"{server.url}/generate (rid {payload['rid']}) gave no answer within "
                                          f"request_timeout_s={self.request_timeout_s}s; the request was aborted")
            finally:
                server.in_flight -= 1
            if status == 200:
                outs = body if isinstance(body, list) else [body]
                if len(outs) != n:
                    raise RolloutServerError(f"{server.url}/generate returned {len(outs)} outputs for n={n}")
                # engines that come back (restarted by us, or by someone else): a server that reports no version is
                # trusted; older than the trainer's: not yet caught up, never trained on; newer: a weight sync under
                # way (async_steps >= 2 generates through it), whose version the trainer side sets once it completes
                # (aborted outputs, a weight-update pause's, are the caller's to generate again or drop, as always)
                returns = self.supervisor is not None or self.catch_up is not None or self.external_wait_s
                served = min([_version(o.get("meta_info", {}).get("weight_version"), self.weight_version) for o in outs
                              if (o.get("meta_info", {}).get("finish_reason") or {}).get("type") != "abort"],
                             default=self.weight_version)
                if returns and served < self.weight_version:
                    errors.append(f"{server.url}: answered with weights older than version {self.weight_version}")
                    if self.catch_up is not None and not self._supervises(server.url):  # not ours, back with its
                        await asyncio.to_thread(self.catch_up)  # own weights (ours are caught up as restarted)
                    elif self.supervisor is None and self.catch_up is None:  # back, and nothing can catch it up
                        raise EnginesLost(f"{server.url} came back serving weight version {served}, older than the "
                                          f"trainer's {self.weight_version}, and this run's weight sync cannot catch "
                                          f"a returning engine up (rollout.weight_sync=disk can); nothing was trained "
                                          f"on it: resume from the last checkpoint")
                    continue
                self.reached = True
                return outs
            if status >= 500 or status == 429:
                errors.append(f"{server.url}: HTTP {status}: {_error_message(body)}")
                continue
            raise RolloutRequestError(f"{server.url}/generate rejected the request (HTTP {status}): "
                                      f"{_error_message(body)}")
        raise RolloutServerError(f"/generate failed after {self.max_retries + 1} attempts: " + "; ".join(errors))

    def _supervises(self, url: str) -> bool:
        """`url` is an engine this process's supervisor restarts (not another node's, not someone else's)."""
        return self.supervisor is not None and url in self.supervisor.urls

    def wait_external(self, errors=()) -> str:
        """Every engine is down and none is this launch's to restart (rollout.backend=http): wait, at most
        `external_wait_s`, for one to answer /health, catch the engines up (`catch_up`) and return its URL; none
        back: EnginesLost, one line. Concurrent callers wait once."""
        with self._external_lock:
            up = [u for u, s in self._servers.items() if s.down_until <= time.monotonic()]
            if up:  # another caller waited meanwhile
                return up[0]
            deadline = time.monotonic() + self.external_wait_s
            while True:
                back = next((u for u in self.urls if _healthy(u, min(5.0, self.external_wait_s))), None)
                if back is not None:
                    log.warning("%s answers /health again; catching the engines up", back)
                    if self.catch_up is not None:
                        self.catch_up()
                    self._servers[back].down_until = 0.0
                    return back
                if time.monotonic() >= deadline:
                    last = "; ".join(list(errors)[-2:]) or "connection refused"
                    raise EnginesLost(f"no engine at rollout.urls ({', '.join(self.urls)}) answered /health within "
                                      f"rollout.engine_wait_s={self.external_wait_s:g} s after all went down (last "
                                      f"errors: {' '.join(last.split())[:300]}); they are not this launch's to "
                                      f"restart: start them again (or fix rollout.urls), then resume")
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    async def generate_group(self, samples: list, sampling_params) -> list:
        """Fill the G prompt-only Samples of one group (same prompt_ids) with one request of n = G.
        `sampling_params`: GenerationParams, or a dict in SGLang's names."""
        if isinstance(sampling_params, GenerationParams):
            sampling_params = sglang_sampling_params(sampling_params)
        if not samples:
            return samples
        prompt = samples[0].prompt_ids
        if any(s.prompt_ids != prompt for s in samples):
            raise ValueError("generate_group needs samples of one prompt (identical prompt_ids)")
        rid = f"g{samples[0].group_id}-{uuid.uuid4().hex[:12]}"
        outs = await self.generate(prompt, {**sampling_params, "n": len(samples)}, rid=rid)
        for sample, out in zip(samples, outs):
            self._fill(sample, out)
        return samples

    def _fill(self, sample, out: dict):
        meta = out["meta_info"]
        triples = meta.get("output_token_logprobs")
        if triples is None:
            raise RolloutServerError("the server returned no output_token_logprobs; it must honour "
                                     "return_logprob=true")
        sample.response_ids = [int(t) for _, t, *_ in triples]
        sample.rollout_logprobs = [float(lp) for lp, *_ in triples]
        sample.response_text = out.get("text", "")
        sample.finish_reason = (meta.get("finish_reason") or {}).get("type", "stop")
        sample.weight_version = _version(meta.get("weight_version"), self.weight_version)
        versions = token_versions(meta.get("weight_versions"), len(sample.response_ids))
        if versions:  # SGLang's weight_version is the newest; a sample's is its oldest token's (types.Sample)
            sample.weight_version = min(versions)
            sample.weight_versions = versions if len(set(versions)) > 1 else None
        if self.return_routed_experts:
            if "routed_experts" not in meta and sample.finish_reason != "abort":
                raise RolloutServerError("the server returned no meta_info.routed_experts for return_routed_experts="
                                         "true: launch SGLang with --enable-return-routed-experts")
            sample.routed_experts = meta.get("routed_experts")

    async def abort_all(self):
        """Abort every in-flight request on every server; pending calls return finish_reason 'abort'."""
        self._abort_epoch += 1
        await self._fan_out("/abort_request", {"rid": "", "abort_all": True}, strict=False)

    async def _abort_quietly(self, url: str, rid: str):
        try:
            await self._call(url, "/abort_request", {"rid": rid}, timeout_s=self.connect_timeout_s)
        except Exception as e:  # noqa: BLE001 - best effort on a server that already misbehaves
            log.warning("could not abort %s on %s: %r", rid, url, e)

    # ------------------------------------------------------------------ control (every worker)
    async def _fan_out(self, path: str, payload=None, *, strict: bool = True, method: str = "POST",
                       timeout_s: Optional[float] = None) -> list:
        """Call `path` on every worker (payload: one dict, or a list with one per worker)."""
        urls = self.worker_urls
        payloads = payload if isinstance(payload, list) else [payload] * len(urls)
        results = await asyncio.gather(*[self._call(u, path, p, method=method, timeout_s=timeout_s or
                                                    self.request_timeout_s) for u, p in zip(urls, payloads)],
                                       return_exceptions=True)
        hung = [i for i, r in enumerate(results) if isinstance(r, asyncio.TimeoutError)]
        if hung and strict:  # a deadline missed names the engine (weight sync: rollout.weight_sync_timeout_s)
            err = RolloutTimeoutError(f"engine {hung[0]} ({urls[hung[0]]}): {path} gave no answer within "
                                      f"{timeout_s or self.request_timeout_s:g} s")
            err.url = urls[hung[0]]
            raise err
        errors = [f"{u}: {r!r}" if isinstance(r, BaseException) else f"{u}: HTTP {r[0]}: {_error_message(r[1])}"
                  for u, r in zip(urls, results) if isinstance(r, BaseException) or r[0] != 200]
        if errors and strict:
            raise RolloutServerError(f"{path} failed on {len(errors)} of {len(urls)} servers: " + "; ".join(errors))
        for e in errors:
            log.warning("%s failed: %s", path, e)
        return [None if isinstance(r, BaseException) else r[1] for r in results]

    async def wait_healthy(self, timeout_s: float = 300.0, interval_s: float = 0.5) -> list:
        """Wait until every worker answers /health with 200; returns their /get_model_info."""
        deadline, pending = time.monotonic() + timeout_s, list(self.worker_urls)
        while True:
            still = []
            for url in pending:
                try:
                    status, _ = await self._call(url, "/health", method="GET", timeout_s=self.connect_timeout_s)
                except (OSError, asyncio.TimeoutError, *_connection_errors()) as e:
                    status = repr(e)
                if status != 200:
                    still.append(f"{url} ({status})")
            if not still:
                return await self._fan_out("/get_model_info", method="GET")
            if time.monotonic() > deadline:
                raise RolloutServerError(f"servers not healthy after {timeout_s:.0f}s: {', '.join(still)}")
            pending = [s.split(" (")[0] for s in still]
            await asyncio.sleep(interval_s)

    async def get_model_info(self) -> list:
        return await self._fan_out("/get_model_info", method="GET")

    async def get_server_info(self) -> list:
        """Every worker's /get_server_info (None where one failed: logged, not raised)."""
        return await self._fan_out("/get_server_info", method="GET", strict=False)

    async def update_weights_from_disk(self, model_path: str, *, weight_version=None,
                                       abort_all_requests: bool = False, timeout_s: Optional[float] = None,
                                       strict: bool = True) -> list:
        payload = {"model_path": str(model_path), "abort_all_requests": abort_all_requests}
        if weight_version is not None:
            payload["weight_version"] = str(weight_version)
        return await self._fan_out("/update_weights_from_disk", payload, timeout_s=timeout_s, strict=strict)

    async def flush_cache(self) -> list:
        return await self._fan_out("/flush_cache")

    async def pause_generation(self, mode: str = "abort") -> list:
        return await self._fan_out("/pause_generation", {"mode": mode})

    async def continue_generation(self) -> list:
        return await self._fan_out("/continue_generation", {})

    async def pause(self) -> None:
        await self.pause_generation()

    async def resume(self) -> None:
        await self.continue_generation()

    def weight_update_session(self):
        return update_session(self)

    async def weights_digest(self) -> list:
        """Each worker's /debug/weights_digest (served by the embedded server: rollout.check_weight_sync)."""
        return await self._fan_out("/debug/weights_digest", {}, timeout_s=120)

    async def release_memory_occupation(self, tags: Optional[list] = None) -> list:
        return await self._fan_out("/release_memory_occupation", {"tags": tags})

    async def resume_memory_occupation(self, tags: Optional[list] = None) -> list:
        return await self._fan_out("/resume_memory_occupation", {"tags": tags})

    async def init_weights_update_group(self, payloads: list, timeout_s: Optional[float] = None) -> list:
        return await self._fan_out("/init_weights_update_group", payloads, timeout_s=timeout_s)

    async def update_weights_from_distributed(self, payload: dict, timeout_s: Optional[float] = None) -> list:
        return await self._fan_out("/update_weights_from_distributed", payload, timeout_s=timeout_s)

    async def begin_weight_update(self) -> list:
        """SGLang's weight-update session: tensor / distributed loads are refused outside begin ... end."""
        return await self._fan_out("/begin_weight_update", {})

    async def end_weight_update(self) -> list:
        return await self._fan_out("/end_weight_update", {})

    async def update_weights_from_tensor(self, payload: dict, timeout_s: Optional[float] = None) -> list:
        """One bucket of CUDA IPC handles (weight_sync.tensor_update_request) to every worker."""
        return await self._fan_out("/update_weights_from_tensor", payload, timeout_s=timeout_s)

    async def destroy_weights_update_group(self, group_name: str) -> list:
        return await self._fan_out("/destroy_weights_update_group", {"group_name": group_name}, strict=False)

    @property
    def weight_version(self) -> int:
        return self.version.value

    async def close(self):
        """Nothing is held between calls (a session per request); kept for symmetry with other clients."""


def token_versions(spans, num_tokens: int) -> Optional[list]:
    """SGLang's `meta_info.weight_versions` spans ([{"version", "start", "end"}], end exclusive) as one version per
    output token; None when absent or when they do not cover the tokens (a server that does not track them). A
    server started without a version names its first weights "default": model.path's, our version 0."""
    if not spans or not num_tokens:
        return None
    out = [None] * num_tokens
    for span in spans:
        v = _version(span.get("version"), 0)
        for i in range(max(0, int(span["start"])), min(num_tokens, int(span["end"]))):
            out[i] = v
    return None if any(v is None for v in out) else out


def _healthy(url: str, timeout_s: float) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/health", timeout=timeout_s) as r:  # /health asks for no key
            return r.status == 200
    except OSError:
        return False


def _version(value, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _connection_errors() -> tuple:
    """Errors that mean "this server is unreachable or died": connection refused/reset, disconnected mid-answer,
    connect timeout (an aiohttp ClientConnectionError); not the total request timeout."""
    import aiohttp

    return (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, ConnectionError)
