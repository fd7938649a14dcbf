"""The pieces the loop strings together: the rollout stage (rank 0), batch assembly and weight sync.

The rollout stage owns the rollout backend (rollout/backends.py: client, weight version, memory release), the reward
scorer, the prompt sampler and the dynamic-sampling buffer. It lives on global rank 0; the other ranks receive the
finished batch as tensors, and every pipeline stage sends its own weights (WeightSyncer). Both reach the engines only
through the backend and its client's interface (rollout/protocol.py: `RolloutFleet`), whatever the engine.
"""
import asyncio
import collections
import dataclasses
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist

from ..algo.advantages import compute_group_advantages
from ..config import Config
from ..data.dataset import PromptDataset
from ..reward.scorer import RewardScorer
from ..rollout.buffer import DynamicSamplingBuffer
from ..rollout.backends import BACKENDS, make_backend
from ..rollout.multi_turn import MultiTurnRunner, multi_turn_metrics
from ..rollout.node_engines import start_node_engines
from ..rollout.protocol import GenerationParams, RolloutFleet
from ..types import Sample
from .progress import RolloutProgress
from .weight_stream import broadcast_samples


class RolloutStage:
    """generate -> reward + overlong shaping -> dynamic sampling, behind one `collect()` call."""

    def __init__(self, cfg: Config, tokenizer, engines=None):
        self.cfg = cfg
        self.loop = asyncio.new_event_loop()
        r = cfg.rollout
        # engines: rollout/node_engines.py start_node_engines (every node's engines, started by its local rank 0;
        # `eval` alone: called here), which also produces the run's API key, in that one place
        engines = engines if engines is not None else start_node_engines(cfg)
        self.api_key = engines.api_key
        self.backend = make_backend(r, model_path=cfg.model.path, seed=cfg.trainer.seed, run_dir=cfg.trainer.run_dir,
                                    api_key=self.api_key, engines=engines)
        self.client: RolloutFleet = self.backend.client
        self.weight_sync = self.backend.make_weight_sync()  # None in distributed mode (each stage sends its own)
        # rollout.multi_turn: each response is a tool-calling conversation (rollout/multi_turn.py)
        self.multi_turn = MultiTurnRunner(r.multi_turn, tokenizer) if r.multi_turn.enabled else None
        self.tools = self.multi_turn.tool_schemas() if self.multi_turn is not None else None  # into the prompts
        d = cfg.data
        self.dataset = PromptDataset(d.path, tokenizer, template=d.template, apply_chat_template=d.apply_chat_template,
                                     max_prompt_length=d.max_prompt_length, seed=d.seed, shuffle=d.shuffle,
                                     tools=self.tools)
        self.scorer = RewardScorer(cfg.reward)
        self.buffer = DynamicSamplingBuffer(cfg.sampling(), self.dataset, self._generate_group, self.scorer,
                                            cfg.overlong_buffer, r.max_response_length)
        self._tool_samples = []  # this step's generated samples, kept or not, for the tool metrics
        self.step = 0
        self.record_generated = cfg.trainer.dump_rollouts > 0  # keep each rollout's groups for train/rollout_dump
        self._generated, self.generated = [], collections.deque()
        self.last_eval_samples: list[Sample] = []
        self.generated_tokens = 0  # every generated response token since step 1 (trainer.max_generated_tokens)
        self._eval_items = None
        # runs a coroutine on self.loop from the trainer's thread (the rollout producer replaces it while its thread
        # runs the loop: train/rollout_producer.py)
        self.run_on_loop = self.loop.run_until_complete
        self.restored: dict = {}  # a checkpoint's rollout state beyond the buffer's (the producer's: "ready", ...)

    @contextmanager
    def engine_memory_released(self):
        """Colocated engines give their GPU memory back while the actor trains (no-op otherwise)."""
        with self.backend.memory_released():
            yield

    def generation_params(self, temperature=None, top_p=None, max_tokens=None) -> GenerationParams:
        r = self.cfg.rollout
        return GenerationParams(temperature=r.temperature if temperature is None else temperature,
                                top_p=r.top_p if top_p is None else top_p, top_k=r.top_k,
                                max_tokens=max_tokens or r.max_response_length)

    async def _generate_group(self, group: list[Sample]) -> list[Sample]:
        # A seed per (step, group) makes generation reproducible, so a resumed run samples the same responses.
        params = dataclasses.replace(self.generation_params(),
                                     seed=hash((self.cfg.trainer.seed, group[0].group_id)) % (2 ** 31))
        done = await self._generate(group, params)
        if self.record_generated:
            self._generated.append(done)
        return done

    async def _generate(self, group: list[Sample], params: GenerationParams, *, step: bool = True) -> list[Sample]:
        """`step`: a rollout's group, counted in the step's tool metrics (eval's are not; with async_steps >= 2 the
        producer may be generating the step's groups meanwhile)."""
        if self.multi_turn is None:
            return await self.client.generate_group(group, params)
        group = await self.multi_turn.generate_group(self.client, group, params)
        if step:
            self._tool_samples.extend(group)
        return group

    def collect(self) -> tuple[list[list[Sample]], dict]:
        """One step's batch, with progress of kept groups (and generation rounds) on stderr (train/progress.py)."""
        return self.loop.run_until_complete(self.acollect())

    async def acollect(self) -> tuple[list[list[Sample]], dict]:
        """`collect` on the stage's event loop (rollout.async_steps >= 2: the producer's thread runs it)."""
        r = self.cfg.rollout
        progress = RolloutProgress(self.step + 1, r.rollout_batch_size, r.rollout_batch_size,
                                   interval_s=self.cfg.trainer.progress_interval_s)
        try:
            groups, metrics = await self.buffer.collect(abort=self.client.abort_all, progress=progress)
        finally:
            progress.close()
        self.step += 1
        if self.record_generated:  # every collect's groups, taken in order by the loop (take_generated)
            self.generated.append(self._generated)
            self._generated = []
        self.generated_tokens += metrics["rollout/generated_tokens"]
        if self.multi_turn is not None:
            metrics.update(multi_turn_metrics(self._tool_samples))
            self._tool_samples = []
        restarts = self.backend.engine_restarts()  # engines restarted so far (supervised backends only)
        if restarts is not None:
            metrics["rollout/engine_restarts"] = restarts
        return groups, {**metrics, "rollout/generated_tokens_total": self.generated_tokens}

    def evaluate(self, tokenizer) -> dict:
        e = self.cfg.eval
        if self._eval_items is None:  # read and tokenise the held-out file once per run
            data = PromptDataset(e.path, tokenizer, template=self.cfg.data.template,
                                 apply_chat_template=self.cfg.data.apply_chat_template, shuffle=False,
                                 tools=self.tools)
            self._eval_items = [data[i] for i in range(min(len(data), e.max_prompts or len(data)))]
        items = self._eval_items
        params = dataclasses.replace(self.generation_params(e.temperature, e.top_p, e.max_response_length), seed=0)

        async def run():
            groups = [[Sample(prompt_ids=list(it.prompt_ids), label=it.label, group_id=-1 - i, index=j)
                       for j in range(e.n_samples)] for i, it in enumerate(items)]
            return await asyncio.gather(*(self._generate(g, params, step=False) for g in groups))

        groups = self.run_on_loop(run())
        samples = [s for g in groups for s in g]
        self.scorer.score_samples(samples)
        self.last_eval_samples = samples
        acc = sum(bool(s.correct) for s in samples) / max(len(samples), 1)
        return {f"eval/avg@{e.n_samples}": acc, "eval/num_prompts": len(items)}

    def take_generated(self) -> list[list[Sample]]:
        """The groups generated by the oldest rollout not yet taken (kept or not); [] unless dumps are on."""
        return self.generated.popleft() if self.generated else []

    def state_dict(self) -> dict:
        return {"buffer": self.buffer.state_dict(), "step": self.step, "generated_tokens": self.generated_tokens}

    def load_state_dict(self, state: dict) -> None:
        groups = [[Sample.from_state_dict(s) for s in g] for g in state.get("groups", [])]  # producer: by index
        self.buffer.load_state_dict(state["buffer"], groups)
        self.restored = {"groups": groups, **{k: state[k] for k in ("ready", "generated") if k in state}}
        self.step = state["step"]
        self.generated_tokens = state.get("generated_tokens", 0)  # absent in checkpoints of earlier versions

    def close(self):
        if self.weight_sync is not None:
            self.weight_sync.close()
        self.loop.run_until_complete(self.client.close())
        self.scorer.close()
        self.backend.shutdown()


def assign_advantages(groups: list[list[Sample]], cfg: Config) -> list[Sample]:
    """Group-normalised advantages (algo/advantages.py) stored per sample; returns the flat batch."""
    a = cfg.algorithm
    for g in groups:
        adv = compute_group_advantages(torch.tensor([s.reward for s in g], dtype=torch.float64), len(g),
                                       eps=a.adv_eps, norm_by_std=a.norm_adv_by_std, leave_one_out=a.leave_one_out)
        for s, v in zip(g, adv.tolist()):
            s.metadata["advantage"] = v
    return [s for g in groups for s in g]


def broadcast_from_rank0(obj):
    """A small object (config-sized, once per run) from rank 0; the per-step data goes as tensors."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_batch(batch):
    """The step's samples from rank 0 to every rank, as tensors (train/weight_stream.py)."""
    return broadcast_samples(batch, src=0)


class WeightSyncer:
    """Pushes the actor's weights to the engines after each step (mode: rollout.weight_sync). Collective.

    tensor / disk: every pipeline stage streams its own tensors in buckets to global rank 0, which feeds the
    in-process engine or writes the (shared-filesystem) folder one bucket at a time. distributed: rank 0 pauses the
    engines; every stage's source rank broadcasts its own buckets over its own group (`dapo_weight_sync_pp{p}`,
    port `DAPO_WEIGHT_SYNC_PORT + p`) to all engine ranks; rank 0 flushes and resumes."""

    def __init__(self, cfg: Config, stage: "RolloutStage | None", engines=None):
        from megatron.core import parallel_state as ps

        self.cfg, self.stage = cfg, stage
        # the same on every rank (the backend class declares it; rank 0 alone holds the backend)
        sync_class = BACKENDS[cfg.rollout.backend].weight_sync_class_of(cfg.rollout)
        self.mode, self.from_stage_sources = sync_class.mode, sync_class.from_stage_sources
        self.bucket_mb = cfg.rollout.weight_sync_bucket_mb
        self.syncs = 0
        # per-node engines: every engine host receives the stream and feeds its own engine
        self.dsts, self.sink = [0], stage.weight_sync if stage is not None else None
        if sync_class.to_engine_hosts and engines is not None and engines.host_ranks:
            self.dsts = engines.host_ranks
            if stage is None and dist.get_rank() in self.dsts:
                self.sink = engines.weight_sink()
        self.sender = None
        if self.from_stage_sources:
            urls, key = broadcast_from_rank0((stage.client.worker_urls, stage.api_key) if stage is not None else None)
            if ps.get_data_parallel_rank() == 0 and ps.get_tensor_model_parallel_rank() == 0:
                self.sender = BACKENDS[cfg.rollout.backend].stage_weight_sender(
                    cfg.rollout, urls, key, ps.get_pipeline_model_parallel_rank(),
                    stage.backend.version if stage is not None else None)

    def sync(self, actor, version: int) -> dict:
        from . import sync_check
        from .weight_stream import WeightStream

        stream = WeightStream(actor, dst=self.dsts, bucket_mb=self.bucket_mb)
        if self.from_stage_sources:
            return self._sync_distributed(stream, version)
        with sync_check.probe() as rss:  # DAPO_CHECK_SYNC=1 (tests): peak RSS during the sync
            stream.run(lambda buckets: self.sink.sync_buckets(self._bounded(buckets), version)
                       if self.sink is not None else None)
        self.syncs += 1  # rollout.check_weight_sync=N: every N-th sync's engines equal the trainer's, else it stops
        checked = sync_check.check(actor, self.dsts, self.sink, self.bucket_mb, rss,
                                   every=self.cfg.rollout.check_weight_sync, syncs=self.syncs, version=version)
        if self.stage is None:
            return {}
        info = self.stage.weight_sync.last_sync
        return {"time/engine_weight_update_s": info.get("seconds", 0.0), "sync/gb": info.get("bytes", 0) / 1e9,
                **checked}

    def _bounded(self, buckets):
        """rollout.weight_sync_timeout_s on each bucket this rank receives from the stream and hands to its sink."""
        from ..rollout.weight_sync import SyncDeadline

        return SyncDeadline(self.cfg.rollout.weight_sync_timeout_s).each(
            buckets, f"the trainer's bucket stream to global rank {dist.get_rank()}")

    def _sync_distributed(self, stream, version: int) -> dict:
        # rank 0 holds the engines' update session (pause ... resume) around every stage's broadcast
        session = self.stage.client.weight_update_session() if self.stage is not None else nullcontext()
        nbytes = 0
        with session:
            dist.barrier()
            if self.sender is not None:
                self.sender.sync_buckets(stream.local_buckets(), version)
                nbytes = self.sender.last_sync["bytes"]
            else:
                for _ in stream.local_buckets():  # TP peers of a source take part in its gathers
                    pass
            dist.barrier()
        if self.stage is not None:
            self.stage.backend.version.set(version)
        return {"sync/gb_stage0": nbytes / 1e9} if self.stage is not None else {}

    def close(self):
        if self.sender is not None:
            self.sender.close()

