"""Embedded rollout engine: Hugging Face transformers generation with SGLang's /generate semantics.

One scheduler thread runs continuous batching over a left-padded KV cache: waiting requests are prefilled together
(the prompt once per request, then repeated for its `n` samples) and merged into the running batch between decode
steps; a row leaves the batch as soon as it finishes. Outputs are SGLang-shaped dicts (`text`, `output_ids`,
`meta_info`), so the HTTP server and the in-process client share one code path.

Log-probs: the log-prob returned for a sampled token is `log_softmax(logits / temperature)` of the *unmodified*
distribution, i.e. before top-p / top-k renormalisation, as SGLang returns it. Greedy (`temperature == 0`) is SGLang's
"temperature 1, top_k 1", so its log-probs are `log_softmax(logits)`.

`output_ids` and `output_token_logprobs` include a matched EOS / stop token (the policy must learn to emit it);
`text` drops it, and drops a matched stop string, unless `no_stop_trim`.

Weight updates wait for running requests to finish (new requests are held back meanwhile), so every response is
produced by one weight version, reported as `meta_info.weight_version`. While paused (`pause_generation(mode=
"in_place" | "retract")`) an update applies at once and the frozen requests continue with the new weights (partial
rollouts): each token keeps the version that sampled it and its log-prob under that version, reported as SGLang
does, `meta_info.weight_versions` = [{"version": "3", "start": 0, "end": 5}, ...] spans of output tokens, and
`meta_info.weight_version` the newest. "retract", as SGLang's, recomputes the requests' KV cache with the new weights,
so the tokens after the update are the new policy's over the whole prefix; "in_place" keeps the old weights' cache.

`hold(steps)` / `release()` / `wait_held()` let a test keep a request in flight for as long as it needs (the scheduler
stops after `steps` more steps; aborts are still answered), instead of racing the machine's generation speed.
"""
import asyncio
import concurrent.futures
import inspect
import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .engine_load import SlotMeter
from .kv_batch import _Batch, _kv_of, _make_cache, _merge, _refill, _select
from .hf_update import check_hf_update, check_same_architecture, copy_hf_tensors
from .routed_experts import RoutingRecorder
from .routed_experts import encode as encode_routed_experts
from .sampling import SamplingParams, _is_int, sample_tokens  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

PAUSE_MODES = ("abort", "in_place", "retract")


@dataclass(eq=False)
class _Seq:
    """One sample (row) of a request."""
    req: "_Request"
    index: int
    seed: int
    output_ids: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish: Optional[dict] = None
    generator: Optional[torch.Generator] = None
    routing: list = field(default_factory=list)  # MoE: [tokens, num_layers, topk] int32 pieces, one per forward
    versions: list = field(default_factory=list)  # the weight version that sampled each output token

    def abort(self):
        if self.finish is None:
            self.finish = {"type": "abort", "message": f"request {self.req.rid} was aborted"}


@dataclass(eq=False)
class _Request:
    rid: str
    prompt_ids: list
    params: SamplingParams
    return_logprob: bool
    return_text_in_logprobs: bool
    future: concurrent.futures.Future
    created: float
    seqs: list = field(default_factory=list)
    return_routed_experts: bool = False  # SGLang's request flag (R3 routing replay)
    aborted: bool = False
    admitted: bool = False


class Engine:
    """In-process generation engine. Thread-safe; `generate` is async, `generate_sync` blocks."""

    def __init__(self, model_path, *, dtype=torch.float32, max_batch_size: int = 64, seed: int = 0,
                 device: str = "cpu", tokenizer_path=None, max_prefill_tokens: int = 16384,
                 deterministic: bool = False):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_path = str(model_path)
        self.tokenizer_path = str(tokenizer_path or model_path)
        if not (Path(self.model_path) / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in {self.model_path}: pass a Hugging Face model folder")
        dtype = str(dtype).replace("torch.", "") if not isinstance(dtype, str) else dtype  # "float32", "bfloat16"
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype).to(device).eval()
        self.dtype, self.device = self.model.dtype, torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        cfg = self.model.config
        if any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or []):
            raise ValueError(f"{self.model_path}: the embedded engine supports full attention only, this model has "
                             f"layer_types {sorted(set(cfg.layer_types))}; serve it with SGLang")
        self.vocab_size = self.model.get_input_embeddings().weight.shape[0]
        self.context_len = int(getattr(cfg, "max_position_embeddings", None) or 1 << 30)
        self.eos_ids = self._eos_ids()
        self._routing = RoutingRecorder(self.model)  # MoE gates' top-k per forward (routed_experts.py)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        forward_args = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in forward_args else "past_key_values"
        self._keep_kw = "logits_to_keep" if "logits_to_keep" in forward_args else "num_logits_to_keep"
        self.max_batch_size, self.max_prefill_tokens = max_batch_size, max_prefill_tokens
        # Like SGLang's --enable-deterministic-inference: one request (its n samples) at a time, so float rounding
        # never depends on what else is batched; makes a run, and its resume, reproducible bit for bit.
        self.deterministic = deterministic
        self.weight_version = 0
        self._seeds = random.Random(seed)
        self._cv = threading.Condition()
        self._step_lock = threading.Lock()
        self._waiting: list = []
        self._requests: dict = {}  # rid -> _Request (waiting or running)
        self._num_active = 0  # admitted, not yet resolved
        self._batch: Optional[_Batch] = None
        self._paused = self._stopped = self._wake = False
        self._pause_mode, self._refill = None, False  # retract: the running rows' KV is recomputed after an update
        self._updates_pending = 0
        self._step_budget: Optional[int] = None  # scheduler steps left before a hold; None: not held
        self._stepping = False
        self.slots = SlotMeter(max_batch_size)  # busy accounting, under self._cv (`load_stats`)
        self._thread = threading.Thread(target=self._loop, name="rollout-engine", daemon=True)
        self._thread.start()

    def _eos_ids(self) -> set:
        gen_cfg = getattr(self.model, "generation_config", None)
        sources = (self.model.config.eos_token_id, getattr(gen_cfg, "eos_token_id", None), self.tokenizer.eos_token_id)
        return {i for src in sources if src is not None for i in (src if isinstance(src, (list, tuple)) else [src])}

    # ------------------------------------------------------------------ requests
    def submit(self, input_ids, sampling_params=None, *, rid: Optional[str] = None, return_logprob: bool = True,
               return_text_in_logprobs: bool = False, return_routed_experts: bool = False) -> concurrent.futures.Future:
        """Queue one prompt; the future resolves to a list of n SGLang-shaped outputs. ValueError on a bad request."""
        params = (sampling_params if isinstance(sampling_params, SamplingParams)
                  else SamplingParams.from_dict(sampling_params))
        prompt = self.check_input_ids(input_ids)
        req = _Request(str(rid) if rid is not None else uuid.uuid4().hex, prompt, params, bool(return_logprob),
                       bool(return_text_in_logprobs), concurrent.futures.Future(), time.time(),
                       return_routed_experts=bool(return_routed_experts))
        if req.return_routed_experts and not self._routing.enabled:
            raise ValueError("return_routed_experts=true needs a mixture-of-experts model; this one has no experts")
        with self._cv:
            if self._stopped:
                raise RuntimeError("the rollout engine was shut down")
            if req.rid in self._requests:
                raise ValueError(f"a request with rid {req.rid!r} is already running")
            req.seqs = [_Seq(req, i, self._seed_for(params, i)) for i in range(params.n)]
            if params.max_new_tokens == 0:
                for s in req.seqs:
                    s.finish = {"type": "length", "length": 0}
                req.future.set_result([self._output(s) for s in req.seqs])
                return req.future
            self._requests[req.rid] = req
            self._waiting.append(req)
            self._cv.notify_all()
        return req.future

    async def generate(self, input_ids, sampling_params=None, *, rid: Optional[str] = None, **kwargs) -> list:
        """Generate n samples for one prompt (async). Cancelling the awaiting task aborts the request."""
        rid = str(rid) if rid is not None else uuid.uuid4().hex
        future = self.submit(input_ids, sampling_params, rid=rid, **kwargs)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            self.abort_request(rid)
            raise

    def generate_sync(self, input_ids, sampling_params=None, **kwargs) -> list:
        return self.submit(input_ids, sampling_params, **kwargs).result()

    def _seed_for(self, params: SamplingParams, index: int) -> int:
        if params.sampling_seed is not None:  # sample i of a seeded request: a fixed mix of (seed, i)
            return (params.sampling_seed * 0x9E3779B1 + index * 0x85EBCA6B + 1) % (2 ** 63)
        return self._seeds.getrandbits(63)

    def check_input_ids(self, input_ids) -> list:
        if not isinstance(input_ids, (list, tuple)) or not input_ids:
            raise ValueError("input_ids must be a non-empty list of token ids")
        for i, t in enumerate(input_ids):
            if not _is_int(t) or not 0 <= t < self.vocab_size:
                raise ValueError(f"input_ids[{i}]={t!r} is not a token id in [0, {self.vocab_size})")
        if len(input_ids) >= self.context_len:
            raise ValueError(f"prompt has {len(input_ids)} tokens; the model's context length is {self.context_len}")
        return list(input_ids)

    def abort_request(self, rid: Optional[str] = None, abort_all: bool = False) -> int:
        """Abort one request (by rid) or all; they return their partial output with finish_reason abort."""
        done = []
        with self._cv:
            targets = list(self._requests.values()) if abort_all else [self._requests.get(str(rid))]
            for req in filter(None, targets):
                req.aborted = True
                if not req.admitted:
                    self._waiting.remove(req)
                    for seq in req.seqs:
                        seq.abort()
                    done.append(req)
            self._wake = True
            self._cv.notify_all()
        self._resolve(done)
        return len([t for t in targets if t is not None])

    # ------------------------------------------------------------------ control
    def pause_generation(self, mode: str = "abort"):
        """Stop scheduling. mode "abort" (SGLang's default) also aborts in-flight requests; "in_place" and
        "retract" keep them, to continue after `continue_generation`. Returns once no step is running."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause mode must be one of {PAUSE_MODES}, got {mode!r}")
        with self._cv:
            self._paused, self._pause_mode = True, mode
        if mode == "abort":
            self.abort_request(abort_all=True)
        with self._step_lock:
            pass

    def continue_generation(self):
        with self._cv:
            self._paused = False
            self._cv.notify_all()

    def hold(self, steps: int = 0):
        """Let the scheduler run at most `steps` more steps (one step: admit + prefill, and one decode), then hold
        the requests in flight where they are until `release()`. Aborts and pauses are still served while held."""
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        with self._cv:
            self._step_budget = int(steps)
            self._cv.notify_all()

    def release(self):
        """End a `hold`: generation continues at full speed."""
        with self._cv:
            self._step_budget = None
            self._cv.notify_all()

    def wait_held(self, timeout_s: float) -> bool:
        """Block until a `hold`'s steps are spent and no step is running; False if that takes over `timeout_s`."""
        with self._cv:
            return self._cv.wait_for(lambda: self._step_budget == 0 and not self._stepping, timeout_s)

    def flush_cache(self) -> bool:
        return True  # no prefix cache is kept across requests: nothing to flush

    def get_model_info(self) -> dict:
        return {"model_path": self.model_path, "tokenizer_path": self.tokenizer_path, "is_generation": True,
                "preferred_sampling_params": None, "weight_version": self.weight_version,
                "vocab_size": self.vocab_size, "max_context_length": self.context_len}

    def update_weights_from_tensor(self, named_tensors, *, weight_version=None, abort_all_requests=False) -> dict:
        """Copy HF-named tensors into the model (all-or-nothing: names and shapes are checked first)."""
        named_tensors = list(named_tensors)
        check_hf_update(self.model, [(n, tuple(t.shape)) for n, t in named_tensors], "update_weights_from_tensor")
        paused = self._exclusive(lambda: copy_hf_tensors(self.model, named_tensors), weight_version,
                                 abort_all_requests)
        return {"success": True, "message": f"updated {len(named_tensors)} tensors; weight_version "
                f"{self.weight_version}", "num_paused_requests": paused}

    def update_weights_from_disk(self, model_path, *, weight_version=None, abort_all_requests=False) -> dict:
        """Load the safetensors of `model_path` (an HF folder of the same architecture) into the model."""
        from ..models.hf_io import HFCheckpointReader

        check_same_architecture(self.model.config, model_path)
        reader = HFCheckpointReader(model_path)  # checks index, shards and truncation before anything is copied
        check_hf_update(self.model, [(n, reader.shape(n)) for n in reader.names], str(model_path), require_all=True)
        paused = self._exclusive(lambda: copy_hf_tensors(self.model, ((n, reader.get(n)) for n in reader.names)),
                                 weight_version, abort_all_requests)
        return {"success": True, "message": f"loaded {model_path}; weight_version {self.weight_version}",
                "num_paused_requests": paused}

    def update_weights_from_buckets(self, buckets, *, weight_version=None, abort_all_requests=False) -> dict:
        """Copy a stream of buckets (lists of HF-named tensors) into the model, one bucket in memory at a time.

        Generation waits for the whole stream, so no request sees a partial update; each bucket's names and shapes
        are checked before it is copied, and the stream must cover every parameter of the model."""
        seen = []

        def apply():
            for bucket in buckets:
                check_hf_update(self.model, [(n, tuple(t.shape)) for n, t in bucket], "weight sync bucket")
                copy_hf_tensors(self.model, bucket)
                seen.extend((n, tuple(t.shape)) for n, t in bucket)
                del bucket  # one bucket in memory at a time
            check_hf_update(self.model, seen, "weight sync", require_all=True)

        paused = self._exclusive(apply, weight_version, abort_all_requests)
        return {"success": True, "message": f"updated {len(seen)} tensors; weight_version {self.weight_version}",
                "num_paused_requests": paused}

    def _exclusive(self, apply, weight_version, abort_all_requests) -> int:
        """Run `apply` when no request is mid-generation (or while paused), then set the weight version."""
        if abort_all_requests:
            self.abort_request(abort_all=True)
        with self._cv:
            self._updates_pending += 1  # holds back admission until the update is applied
        try:
            with self._cv:
                while self._num_active and not self._paused:
                    self._cv.wait()
                paused = self._num_active
            with self._step_lock:
                apply()
                self.weight_version = int(weight_version) if weight_version is not None else self.weight_version + 1
                self._refill = self._refill or (self._paused and self._pause_mode == "retract")
        finally:
            with self._cv:
                self._updates_pending -= 1
                self._cv.notify_all()
        return paused

    def shutdown(self):
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
        self._thread.join(timeout=30)
        with self._cv:
            reqs, self._requests, self._waiting = list(self._requests.values()), {}, []
        for req in reqs:
            if not req.future.done():
                req.future.set_exception(RuntimeError("the rollout engine was shut down"))

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def is_paused(self) -> bool:
        return self._paused

    @property
    def num_requests(self) -> int:
        """Requests waiting or running."""
        return len(self._requests)

    def load_stats(self) -> dict:
        """Cumulative busy counters (rollout/engine_load.py: SlotMeter); two reads give a window's busy fraction."""
        with self._cv:
            return self.slots.stats()

    # ------------------------------------------------------------------ scheduler
    def _loop(self):
        while True:
            with self._cv:
                while not (self._stopped or self._wake or self._has_work()):
                    self._cv.wait()
                if self._stopped:
                    return
                self._wake = False
                allowed = self._step_budget != 0  # False while held: only aborted rows are dropped and answered
                admitted = self._admit() if allowed else []
                forward = bool(admitted) or (self._batch is not None and not self._paused)
                if allowed and forward and self._step_budget is not None:
                    self._step_budget -= 1
                self._stepping = True
                self.slots.mark(self.slots.rows + sum(r.params.n for r in admitted))
            try:
                with self._step_lock, torch.inference_mode():
                    if self._refill and self._batch is not None:  # before new rows join: theirs is fresh
                        self._batch = _refill(self._forward, self._batch.rows, self.pad_id, self.device)
                        self._routing.take(self._batch.mask.numel())  # MoE: the recorded routing stays the first
                    self._refill = False
                    if admitted:
                        self._prefill(admitted)
                    done = self._drop_finished()
                    decoded = 0
                    if self._batch is not None and allowed and not self._paused:
                        decoded = len(self._batch.rows)
                        self._decode()
                        done += self._drop_finished()
            except Exception as e:  # keep serving: fail what was running, report the cause to each caller
                log.exception("rollout engine step failed")
                done, decoded = self._fail_running(admitted, e), 0
            self._resolve(done)
            with self._cv:
                self.slots.mark(len(self._batch.rows) if self._batch is not None else 0, decoded)
                self._stepping = False
                self._cv.notify_all()

    def _has_work(self) -> bool:
        if self._paused or self._step_budget == 0:
            return False
        return (self._batch is not None) or (bool(self._waiting) and not self._updates_pending)

    def _admit(self) -> list:
        if self._paused or self._updates_pending:
            return []
        rows = len(self._batch.rows) if self._batch is not None else 0
        admitted, tokens = [], 0
        while self._waiting:
            req = self._waiting[0]
            n, cost = req.params.n, len(req.prompt_ids)
            fits = (rows + n <= self.max_batch_size and tokens + cost <= self.max_prefill_tokens
                    and not self.deterministic)
            # the first request of an empty batch always goes in, even with n > max_batch_size
            if (admitted or rows) and not fits:
                break
            self._waiting.pop(0)
            req.admitted = True
            admitted.append(req)
            rows, tokens = rows + n, tokens + cost
        self._num_active += len(admitted)
        return admitted

    def _forward(self, ids, mask, pos, cache):
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                         **{self._cache_kw: cache, self._keep_kw: 1})
        return out.logits[:, -1].float()

    def _prefill(self, reqs: list):
        width = max(len(r.prompt_ids) for r in reqs)
        ids = torch.full((len(reqs), width), self.pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(reqs):
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids, device=self.device)
            mask[i, width - len(r.prompt_ids):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = _make_cache([])
        logits = self._forward(ids, mask, pos, cache)
        routing = self._routing.take(ids.numel())
        if routing is not None:  # rows (request, position) of the left-padded prompts; shared by a prompt's n samples
            routing = routing.view(len(reqs), width, *routing.shape[1:])
            for i, r in enumerate(reqs):
                for s in r.seqs:
                    s.routing = [routing[i, width - len(r.prompt_ids):]]
        rep = torch.tensor([i for i, r in enumerate(reqs) for _ in range(r.params.n)], device=self.device)
        rows = [s for r in reqs for s in r.seqs]
        for s in rows:
            s.generator = torch.Generator().manual_seed(s.seed)
        pending = self._sample(logits[rep], rows)
        kv = [(k[rep], v[rep]) for k, v in _kv_of(cache)]  # the prompt is prefilled once for its n samples
        new = _Batch(rows, _make_cache(kv), mask[rep], mask.sum(-1)[rep], pending)
        self._batch = new if self._batch is None else _merge(self._batch, new)

    def _decode(self):
        b = self._batch
        mask = torch.cat([b.mask, torch.ones_like(b.mask[:, :1])], dim=1)
        logits = self._forward(b.pending[:, None], mask, b.next_pos[:, None], b.cache)
        routing = self._routing.take(len(b.rows))
        if routing is not None:
            for s, row in zip(b.rows, routing):
                s.routing.append(row[None])
        b.mask, b.next_pos = mask, b.next_pos + 1
        b.pending = self._sample(logits, b.rows)

    def _sample(self, logits, rows) -> torch.Tensor:
        def col(values, dtype):
            return torch.tensor(values, dtype=dtype, device=logits.device)

        ps = [s.req.params for s in rows]
        uniform = torch.stack([torch.rand((), generator=s.generator) for s in rows]).to(logits.device)
        tokens, logprobs = sample_tokens(logits, col([p.temperature for p in ps], torch.float32),
                                         col([p.top_p for p in ps], torch.float32),
                                         col([p.top_k for p in ps], torch.long), uniform)
        for s, t, lp in zip(rows, tokens.tolist(), logprobs.tolist()):
            s.output_ids.append(t)
            s.logprobs.append(lp)
            s.versions.append(self.weight_version)  # updates apply between steps (_step_lock): these logits' weights
            s.finish = self._stop_reason(s, t)
        return tokens

    def _stop_reason(self, s: _Seq, token: int) -> Optional[dict]:
        p = s.req.params
        if token in p.stop_token_ids or (token in self.eos_ids and not p.ignore_eos):
            return {"type": "stop", "matched": token}
        if p.stop:
            tail = self.tokenizer.decode(s.output_ids[-(max(map(len, p.stop)) + 2):],
                                         skip_special_tokens=p.skip_special_tokens)
            for stop in p.stop:
                if stop in tail:
                    return {"type": "stop", "matched": stop}
        if len(s.output_ids) >= p.max_new_tokens:
            return {"type": "length", "length": p.max_new_tokens}
        if len(s.req.prompt_ids) + len(s.output_ids) >= self.context_len:
            return {"type": "length", "length": len(s.output_ids)}
        return None

    def _drop_finished(self) -> list:
        """Remove finished or aborted rows from the batch; return the requests now complete."""
        b, done = self._batch, []
        if b is None:
            return done
        keep = []
        for i, s in enumerate(b.rows):
            if s.req.aborted:
                s.abort()
            if s.finish is None:
                keep.append(i)
            elif all(x.finish is not None for x in s.req.seqs) and s.req not in done:
                done.append(s.req)
        if len(keep) < len(b.rows):
            self._batch = _select(b, keep)
        return done

    def _fail_running(self, admitted, error) -> list:
        reqs = {id(s.req): s.req for s in (self._batch.rows if self._batch else [])}
        reqs.update({id(r): r for r in admitted})
        self._batch = None
        for req in reqs.values():
            req.future.set_exception(RuntimeError(f"rollout engine step failed: {error!r}"))
        return list(reqs.values())

    def _resolve(self, done: list):
        """Answer finished requests, then release them: a waiting weight update applies only after."""
        if not done:
            return
        with self._cv:
            for req in done:
                self._requests.pop(req.rid, None)
        for req in done:
            if not req.future.done():
                req.future.set_result([self._output(s) for s in req.seqs])
        with self._cv:
            self._num_active -= sum(req.admitted for req in done)
            self._cv.notify_all()

    # ------------------------------------------------------------------ outputs
    def _output(self, s: _Seq) -> dict:
        req, p = s.req, s.req.params
        matched = (s.finish or {}).get("matched")
        ids = s.output_ids[:-1] if isinstance(matched, int) and not p.no_stop_trim else s.output_ids
        text = self.tokenizer.decode(ids, skip_special_tokens=p.skip_special_tokens)
        if isinstance(matched, str) and not p.no_stop_trim and matched in text:
            text = text[:text.index(matched)]
        meta = {"id": req.rid if p.n == 1 else f"{req.rid}-{s.index}", "prompt_tokens": len(req.prompt_ids),
                "completion_tokens": len(s.output_ids), "cached_tokens": 0, "finish_reason": s.finish,
                "weight_version": self.weight_version, "e2e_latency": time.time() - req.created,
                "weight_versions": version_spans(s.versions, self.weight_version)}
        if req.return_logprob:
            texts = ([self.tokenizer.decode([t]) for t in s.output_ids] if req.return_text_in_logprobs
                     else [None] * len(s.output_ids))
            meta["output_token_logprobs"] = [[lp, t, x] for lp, t, x in zip(s.logprobs, s.output_ids, texts)]
        if req.return_routed_experts:  # one row per token fed: the prompt, then every output token but the last
            meta["routed_experts"] = encode_routed_experts(s.routing, len(req.prompt_ids) + len(s.output_ids) - 1)
        return {"text": text, "output_ids": list(s.output_ids), "meta_info": meta}


def version_spans(versions: list, current: int) -> list:
    """Per-token versions as SGLang's `meta_info.weight_versions`: runs of one version, [start, end) over the output
    tokens, versions as strings; no token yet: one empty span of the current version."""
    spans = []
    for i, v in enumerate(versions):
        if spans and spans[-1]["version"] == str(v):
            spans[-1]["end"] = i + 1
        else:
            spans.append({"version": str(v), "start": i, "end": i + 1})
    return spans or [{"version": str(current), "start": 0, "end": 0}]
