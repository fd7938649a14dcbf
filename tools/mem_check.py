"""The memory estimate (dapo_megatron/memory.py) against what the actor really holds, on CPU, layout by layout.

    PYTHONPATH=$PWD python tools/mem_check.py [--groups tp1,tp2,pp2,tp2pp2] [--variants packed,padded,...]

For each parallel layout (a torchrun of TP x PP ranks) and each actor variant (packed / padded micro-batches,
recompute none / selective / full) one Actor on a tiny Qwen2.5-shaped model takes one optimizer step. Each rank
measures
- model states: the bytes of its parameters, of megatron's grad buffers and of the optimizer's tensors (Adam
  moments, master copies), summed from the tensors after the step;
- activations: the bytes saved for backward while one micro-batch runs forward on this stage, each storage counted
  once (torch.autograd.graph.saved_tensors_hooks, keyed by untyped_storage().data_ptr(); parameters excluded; what a
  recompute saves inside backward excluded), for its largest micro-batch;
and the estimate for the same shapes (the micro-batch's real sequence lengths and response tokens, the weights' dtype
and the optimizer as the actor built them). It prints one row per stage and layout with measured / estimated
ratios. On a GPU (bf16, distributed optimizer, Transformer Engine layers) it also prints the step's
torch.cuda.max_memory_allocated against the estimate's total for the stage.

As a rank script (`--ranks TP PP HF_DIR OUT VARIANTS`) it writes the rows to OUT (tests/test_memory_measured.py).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GROUPS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2), "tp2pp2": (2, 2)}
VARIANTS = {
    "packed": {},
    "padded": {"use_remove_padding": False},
    "selective": {"recompute_granularity": "selective"},
    "padded_selective": {"use_remove_padding": False, "recompute_granularity": "selective"},
    "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
    "full_block": {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 1},
    # sequence parallelism (TP > 1 only; the variants above run without it)
    "sp_packed": {"sequence_parallel": True},
    "sp_padded": {"sequence_parallel": True, "use_remove_padding": False},
    "sp_selective": {"sequence_parallel": True, "recompute_granularity": "selective"},
    "sp_padded_selective": {"sequence_parallel": True, "use_remove_padding": False,
                            "recompute_granularity": "selective"},
    "sp_full": {"sequence_parallel": True, "recompute_granularity": "full", "recompute_method": "uniform",
                "recompute_num_layers": 1},
}


def samples(vocab: int, n: int = 8):
    import torch

    from dapo_megatron.rollout.sample import Sample

    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):  # prompts 16..40 tokens, responses 24..66: ragged micro-batches
        p, r = 16 + (i * 7) % 25, 24 + (i * 13) % 43
        ids = torch.randint(1, vocab, (p + r,), generator=g).tolist()
        lp = (-torch.rand(r, generator=g) - 1.0).tolist()
        out.append(Sample(prompt_ids=ids[:p], response_ids=ids[p:], loss_mask=[1] * r, rollout_logprobs=lp,
                          metadata={"advantage": float(torch.randn((), generator=g)), "old_logprobs": lp}))
    return out


class SavedBytes:
    """Bytes saved for backward per micro-batch forward, each storage once, parameters and recomputes excluded."""

    def __init__(self, exclude: set):
        self.exclude, self.per_mb, self.current = exclude, [], None

    def start(self, info: dict):
        self.current = {}
        self.per_mb.append((info, self.current))

    def pack(self, t):
        import torch

        if self.current is None or torch._C._current_graph_task_id() != -1:  # a recompute inside backward
            return t
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in self.exclude:
            self.current[ptr] = storage.nbytes()
        return t


def model_state_bytes(actor) -> dict:
    params = list(actor.model.module.parameters())
    own = {p.untyped_storage().data_ptr() for p in params}
    weights = sum(p.numel() * p.element_size() for p in params)
    grads = sum(b.grad_data.numel() * b.grad_data.element_size()
                for b in actor.model.buffers + actor.model.expert_parallel_buffers)
    opt, seen = 0, set()
    for sub in getattr(actor.optimizer, "chained_optimizers", [actor.optimizer]):
        inner = sub.optimizer
        tensors = [v for st in inner.state.values() for v in st.values() if hasattr(v, "numel") and v.dim() > 0]
        tensors += [p for g in inner.param_groups for p in g["params"] if p.untyped_storage().data_ptr() not in own]
        for t in tensors:  # moments and master copies (a master that views a weight is not a copy)
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                opt += t.numel() * t.element_size()
    return {"weights": weights, "grads": grads, "optimizer": opt}


def rank_main(tp: int, pp: int, hf_dir: str, out: str, variants: list) -> None:
    import dataclasses

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from dapo_megatron import memory, parallel
    from dapo_megatron.algo.loss import PolicyLossConfig
    from dapo_megatron.models import ModelConfig
    from dapo_megatron.models.hf_config import padded_vocab_size
    from dapo_megatron.train.actor import Actor, ActorConfig

    stage, rows = None, []
    on_gpu = torch.cuda.is_available()
    for name in variants:
        over = dict(VARIANTS[name])
        sp = over.pop("sequence_parallel", False)
        if sp and tp == 1:
            continue
        # a process may build models with SP on and off: initialize records the setting for the next build
        parallel.initialize(parallel.ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                                    sequence_parallel=sp))
        stage = ps.get_pipeline_model_parallel_rank()
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        cfg = ActorConfig(global_batch_size=8, micro_batch_size=4, lr=1e-4, weight_decay=0.0, **over)
        actor = Actor(ModelConfig(path=hf_dir), cfg, PolicyLossConfig(), pad_id=0)
        exclude = {p.untyped_storage().data_ptr() for p in actor.model.parameters()}
        exclude |= {b.grad_data.untyped_storage().data_ptr() for b in actor.model.buffers}
        saved = SavedBytes(exclude)
        forward = actor.model.forward

        def counting_forward(tokens, position_ids, mask, packed_seq_params=None, **kw):
            cu = packed_seq_params.cu_seqlens_q.tolist() if packed_seq_params is not None else None
            head = actor.head.index.numel() if actor.head is not None and actor.head.index is not None else 0
            saved.start({"shape": list(tokens.shape), "cu": cu, "response": head})
            return forward(tokens, position_ids, mask, packed_seq_params=packed_seq_params, **kw)

        actor.model.forward = counting_forward
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            actor.train_step(samples(actor.arch.vocab_size))
        actor.model.forward = forward
        measured = model_state_bytes(actor)
        if on_gpu:  # the whole step's peak, to compare with the estimate's total
            measured["peak_allocated"] = torch.cuda.max_memory_allocated()
        info, kept = max(saved.per_mb, key=lambda x: x[0]["shape"][0] * x[0]["shape"][1])
        b, s = info["shape"]
        seq_lens = tuple(y - x for x, y in zip(info["cu"], info["cu"][1:])) if info["cu"] else (s,) * b
        shape = memory.Shape(
            tp=tp, pp=pp, dp=1, sp=bool(actor.config.sequence_parallel),
            dist_opt=on_gpu if cfg.use_distributed_optimizer is None else cfg.use_distributed_optimizer,
            param_bytes=actor.config.params_dtype.itemsize, on_gpu=on_gpu, num_microbatches=len(saved.per_mb),
            recompute=cfg.recompute_granularity, recompute_method=cfg.recompute_method,
            recompute_num_layers=cfg.recompute_num_layers, seq_lens=seq_lens, packed=info["cu"] is not None,
            response_tokens=info["response"], padded_vocab=padded_vocab_size(actor.arch.vocab_size, 128, tp))
        w, g, o = memory.model_states(actor.arch, stage, shape)
        acts = memory.stage_activations(actor.arch, stage, shape)[0]
        if stage == pp - 1:
            acts += memory.saved_logits(actor.arch, shape)
        estimated = {"weights": w, "grads": g, "optimizer": o, "activations": acts}
        if on_gpu:
            estimated["total"] = memory.estimate(actor.arch, shape).stages[stage].total
        rows.append({"layout": f"TP{tp} PP{pp}", "variant": name, "rank": dist.get_rank(), "stage": stage,
                     "tokens": shape.tokens, "measured": {**measured, "activations": sum(kept.values())},
                     "estimated": estimated,
                     "shape": dataclasses.asdict(shape)})
        del actor
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, rows)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps([r for p in parts for r in p]))
    parallel.destroy()


def ratios(row: dict) -> dict:
    m, e = row["measured"], row["estimated"]
    states = sum(m[k] for k in ("weights", "grads", "optimizer")) / sum(e[k] for k in ("weights", "grads", "optimizer"))
    return {"states": states, "activations": m["activations"] / e["activations"]}


def table(rows: list) -> str:
    lines = ["| layout | variant | first rank (stage) | tokens | states measured / est. (KiB) | ratio | activations "
             "measured / est. (KiB) | ratio |", "|---|---|---|---|---|---|---|---|"]
    seen = set()
    for r in rows:
        if (r["layout"], r["variant"], r["stage"]) in seen:  # the TP ranks of a stage hold the same
            continue
        seen.add((r["layout"], r["variant"], r["stage"]))
        m, e, q = r["measured"], r["estimated"], ratios(r)
        ms, es = (sum(x[k] for k in ("weights", "grads", "optimizer")) / 1024 for x in (m, e))
        lines.append(f"| {r['layout']} | {r['variant']} | {r['rank']} ({r['stage']}) | {r['tokens']} | {ms:.0f} / "
                     f"{es:.0f} | {q['states']:.3f} | {m['activations'] / 1024:.0f} / {e['activations'] / 1024:.0f} | "
                     f"{q['activations']:.3f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--groups", default=",".join(GROUPS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--ranks", nargs=5, metavar=("TP", "PP", "HF_DIR", "OUT", "VARIANTS"))
    a = ap.parse_args()
    if a.ranks:
        tp, pp, hf, out, variants = a.ranks
        return rank_main(int(tp), int(pp), hf, out, variants.split(","))
    from dapo_megatron.models.tiny import make_tiny_hf_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        hf = make_tiny_hf_model(Path(tmp) / "hf", "qwen2.5", seed=0)
        for group in a.groups.split(","):
            tp, pp = GROUPS[group]
            out = Path(tmp) / f"{group}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={tp * pp}",
                   __file__, "--ranks", str(tp), str(pp), str(hf), str(out), a.variants]
            subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO,
                           stdout=subprocess.DEVNULL)
            rows += json.loads(out.read_text())
    print(table(rows))
    for r in rows:  # GPU only: the step's torch.cuda.max_memory_allocated against the estimate's stage total
        if "peak_allocated" in r["measured"]:
            print(f"{r['layout']} {r['variant']} rank {r['rank']}: max_memory_allocated "
                  f"{r['measured']['peak_allocated'] / 2 ** 20:.1f} MiB, estimated total "
                  f"{r['estimated']['total'] / 2 ** 20:.1f} MiB")
    worst = max(max(abs(q - 1) for q in ratios(r).values()) for r in rows)
    print(f"\nlargest deviation: {worst:.1%} (bounds: 10% model states, 15% activations)")


if __name__ == "__main__":
    main()
