"""The pieces the loop strings together: the rollout stage (rank 0), batch assembly and weight sync.

The rollout stage owns the engine client, the reward scorer, the prompt sampler and the dynamic-sampling buffer.
It lives on global rank 0; the other ranks receive the finished batch by broadcast.
"""
import asyncio
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from ..algo.advantages import compute_group_advantages
from ..config import Config
from ..data.dataset import PromptDataset
from ..reward.scorer import RewardScorer
from ..rollout.buffer import DynamicSamplingBuffer
from ..rollout.client import RolloutClient
from ..rollout.sample import Sample


class RolloutStage:
    """generate -> reward + overlong shaping -> dynamic sampling, behind one `collect()` call."""

    def __init__(self, cfg: Config, tokenizer):
        self.cfg = cfg
        self.loop = asyncio.new_event_loop()
        self.engine = self.servers = None
        r = cfg.rollout
        client_kw = dict(max_concurrency=r.max_concurrency, request_timeout_s=r.request_timeout_s)
        if r.backend == "embedded":
            from ..rollout.engine import Engine

            self.engine = Engine(cfg.model.path, max_batch_size=r.engine_max_batch_size, seed=cfg.trainer.seed,
                                 deterministic=r.deterministic)
            self.client = RolloutClient(engine=self.engine, **client_kw)
        elif r.backend == "sglang":
            from ..rollout.sglang_launcher import SGLangServers

            self.servers = SGLangServers(cfg.model.path, r.sglang_num_servers, r.sglang_tp_size,
                                         r.sglang_mem_fraction_static, r.sglang_base_port,
                                         enable_memory_saver=r.colocate, router=r.sglang_router,
                                         ep_size=r.sglang_ep_size).start()
            self.client = self.servers.client(**client_kw)
        else:
            self.client = RolloutClient(list(r.urls), **client_kw)
        self.weight_sync = self._make_weight_sync()
        d = cfg.data
        self.dataset = PromptDataset(d.path, tokenizer, template=d.template, apply_chat_template=d.apply_chat_template,
                                     max_prompt_length=d.max_prompt_length, seed=d.seed, shuffle=d.shuffle)
        self.scorer = RewardScorer(cfg.reward)
        self.buffer = DynamicSamplingBuffer(cfg.sampling(), self.dataset, self._generate_group, self.scorer,
                                            cfg.overlong_buffer, r.max_response_length)
        self.step = 0
        self._eval_items = None

    def _make_weight_sync(self):
        from ..rollout.weight_sync import make_weight_sync

        mode = self.cfg.rollout.weight_sync
        if mode == "auto":
            mode = "tensor" if self.engine is not None else "disk"
        if mode == "tensor":
            return make_weight_sync("tensor", self.client)
        if mode == "disk":
            return make_weight_sync("disk", self.client, self.cfg.model.path,
                                    Path(self.cfg.trainer.run_dir) / "weight_sync")
        return make_weight_sync("distributed", self.client, master_address=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                                master_port=int(os.environ.get("DAPO_WEIGHT_SYNC_PORT", "29600")),
                                engine_ranks=self.cfg.rollout.sglang_num_servers * self.cfg.rollout.sglang_tp_size)

    @contextmanager
    def engine_memory_released(self):
        """Colocated SGLang engines give their GPU memory back while the actor trains (no-op otherwise)."""
        if self.servers is not None and self.cfg.rollout.colocate:
            with self.servers.memory_released():
                yield
        else:
            yield

    def sampling_params(self, temperature=None, top_p=None, max_new_tokens=None) -> dict:
        r = self.cfg.rollout
        return {"temperature": r.temperature if temperature is None else temperature,
                "top_p": r.top_p if top_p is None else top_p, "top_k": r.top_k,
                "max_new_tokens": max_new_tokens or r.max_response_length}

    async def _generate_group(self, group: list[Sample]) -> list[Sample]:
        params = self.sampling_params()
        # A seed per (step, group) makes generation reproducible, so a resumed run samples the same responses.
        params["sampling_seed"] = hash((self.cfg.trainer.seed, group[0].group_id)) % (2 ** 31)
        return await self.client.generate_group(group, params)

    def collect(self) -> tuple[list[list[Sample]], dict]:
        """One step's batch, with a progress bar of kept groups (and generation rounds) on stderr."""
        from tqdm import tqdm

        bar = tqdm(total=self.cfg.rollout.rollout_batch_size, desc=f"rollout {self.step + 1}", unit="group",
                   leave=False, dynamic_ncols=True, disable=None)  # None: only on a terminal

        def progress(kept, stats):
            bar.n = min(kept, bar.total)
            rounds = -(-stats["prompts_consumed"] // self.cfg.rollout.rollout_batch_size)
            bar.set_postfix(generated=stats["groups_generated"], round=rounds,
                            acc=f"{stats['correct'] / max(1, stats['responses']):.2f}")

        try:
            groups, metrics = self.loop.run_until_complete(
                self.buffer.collect(abort=self.client.abort_all, progress=progress))
        finally:
            bar.close()
        self.step += 1
        return groups, metrics

    def evaluate(self, tokenizer) -> dict:
        e = self.cfg.eval
        if self._eval_items is None:  # read and tokenise the held-out file once per run
            data = PromptDataset(e.path, tokenizer, template=self.cfg.data.template,
                                 apply_chat_template=self.cfg.data.apply_chat_template, shuffle=False)
            self._eval_items = [data[i] for i in range(min(len(data), e.max_prompts or len(data)))]
        items = self._eval_items
        params = self.sampling_params(e.temperature, e.top_p, e.max_response_length)
        params["sampling_seed"] = 0

        async def run():
            groups = [[Sample(prompt_ids=list(it.prompt_ids), label=it.label, group_id=-1 - i, index=j)
                       for j in range(e.n_samples)] for i, it in enumerate(items)]
            return await asyncio.gather(*(self.client.generate_group(g, params) for g in groups))

        groups = self.loop.run_until_complete(run())
        samples = [s for g in groups for s in g]
        self.scorer.score_samples(samples)
        acc = sum(bool(s.correct) for s in samples) / max(len(samples), 1)
        return {f"eval/avg@{e.n_samples}": acc, "eval/num_prompts": len(items)}

    def state_dict(self) -> dict:
        return {"buffer": self.buffer.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.buffer.load_state_dict(state["buffer"])
        self.step = state["step"]

    def close(self):
        self.weight_sync.close()
        self.loop.run_until_complete(self.client.close())
        self.scorer.close()
        if self.engine is not None:
            self.engine.shutdown()
        if self.servers is not None:
            self.servers.shutdown()


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
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def collect_hf_weights(actor) -> list:
    """Full HF-named tensors of the whole model on global rank 0 (empty list elsewhere). Collective."""
    from megatron.core import parallel_state as ps
    from safetensors.torch import load_file, save_file

    mine = []
    keep = ps.get_data_parallel_rank() == 0
    if keep or ps.get_expert_model_parallel_world_size() > 1:  # experts are all-gathered over EP: all ranks walk
        for n, t in actor.hf_weights():
            if keep:
                mine.append((n, t.detach().to("cpu", copy=True)))
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return mine if dist.get_rank() == 0 else []
    # Pipeline stages hand their tensors to rank 0 through a shared folder (single node).
    folder = broadcast_from_rank0(tempfile.mkdtemp(prefix="dapo_sync_") if dist.get_rank() == 0 else None)
    first = ps.get_data_parallel_rank() == 0 and ps.get_tensor_model_parallel_rank() == 0
    if first and dist.get_rank() != 0:
        save_file(dict(mine), str(Path(folder) / f"stage{ps.get_pipeline_model_parallel_rank()}.safetensors"))
    dist.barrier()
    if dist.get_rank() != 0:
        return []
    for f in sorted(Path(folder).glob("stage*.safetensors")):
        mine.extend(load_file(str(f)).items())
        f.unlink()
    Path(folder).rmdir()
    return mine


def sync_weights(actor, stage: "RolloutStage | None", version: int) -> dict:
    """Push the actor's weights to the rollout engines (mode: rollout.weight_sync). Collective."""
    named = collect_hf_weights(actor)
    if stage is None:
        return {}
    stage.weight_sync.weight_version = version - 1  # engines report `version` with every sample from now on
    stage.weight_sync.sync(named)
    info = stage.weight_sync.last_sync
    return {"time/engine_weight_update_s": info.get("seconds", 0.0), "sync/gb": info.get("bytes", 0) / 1e9}
