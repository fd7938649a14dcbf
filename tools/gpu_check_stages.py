"""Stage bodies of tools/gpu_check.py; each runs in its own process: `python tools/gpu_check_stages.py NAME OUT_DIR`.

Importable on CPU (GPU libraries are imported inside the stages). Each stage writes OUT_DIR/NAME.json with
{"ok": bool, "numbers": {...}, "detail": str} and drives the package's own GPU code paths.
"""
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from gpu_check import QWEN25_05B, mfu, peak_flops_for, train_flops_per_token  # noqa: E402

SMALL = {"hidden_size": 256, "intermediate_size": 704, "num_attention_heads": 4, "num_key_value_heads": 2,
         "vocab_size": 1024}  # FP8 GEMMs need dims divisible by 16
QWEN_HF = {"hidden_size": QWEN25_05B.hidden, "intermediate_size": QWEN25_05B.ffn, "num_hidden_layers":
           QWEN25_05B.layers, "num_attention_heads": QWEN25_05B.heads, "num_key_value_heads": QWEN25_05B.kv_heads,
           "vocab_size": QWEN25_05B.vocab, "tie_word_embeddings": True}


def _model(out: Path, name: str, **shape) -> Path:
    from dapo_megatron.models.tiny import make_tiny_hf_model

    path = out / "models" / name
    return path if (path / "config.json").is_file() else make_tiny_hf_model(path, family="qwen2.5", seed=0, **shape)


def stage1_gpu_tests(out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                           str(REPO / "tests")], capture_output=True, text=True, cwd=REPO)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary)}
    return {"ok": proc.returncode == 0 and counts.get("passed", 0) > 0, "numbers": counts,
            "detail": proc.stdout[-3000:] + proc.stderr[-2000:]}


def stage2_te_fp8(out: Path) -> dict:
    import torch

    from dapo_megatron import parallel
    from dapo_megatron.models.builder import build_gpt_model
    from dapo_megatron.models.hf_config import arch_from_hf, load_hf_config
    from dapo_megatron.models.weights import load_hf_weights, safetensors_getter

    parallel.initialize()
    path = _model(out, "small", **SMALL)
    arch, get = arch_from_hf(load_hf_config(path)), safetensors_getter(path)
    tokens = torch.randint(0, SMALL["vocab_size"], (4, 256), device="cuda")
    pos = torch.arange(256, device="cuda")[None].expand(4, -1)

    def run(model, steps=1):
        logits = None
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            logits = model(tokens, pos, None)
            logits.float().logsumexp(-1).mean().backward()
        torch.cuda.synchronize()
        return logits.detach().float(), (time.perf_counter() - t0) / steps

    local = build_gpt_model(arch, on_gpu=False).cuda()  # local spec, fp32: the reference
    load_hf_weights(local, arch, get)
    ref, _ = run(local)
    numbers, ok = {}, True
    for name, fp8, recipe, tol in (("bf16", None, "delayed", 0.05), ("fp8_delayed", "e4m3", "delayed", 0.25),
                                   ("fp8_current", "e4m3", "current", 0.25)):
        model = build_gpt_model(arch, fp8=fp8, fp8_recipe=recipe, on_gpu=True).cuda()
        load_hf_weights(model, arch, get)
        run(model, 2)  # warm-up (FP8 delayed scaling needs amax history)
        logits, step_s = run(model, 5)
        rel = ((logits - ref).abs().mean() / ref.abs().mean()).item()
        numbers.update({f"{name}_logits_rel_diff": rel, f"{name}_fwd_bwd_ms": step_s * 1e3})
        ok = ok and rel < tol and all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    return {"ok": ok, "numbers": numbers, "detail": "rel diff = mean|logits - local fp32| / mean|local fp32|"}


class GpuMemory:
    """Peak GPU memory per side (sglang processes vs the trainer), sampled from nvidia-smi every 0.5 s."""

    def __init__(self):
        self.peak = {"engine_gib": 0.0, "trainer_gib": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.5):
            q = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True).stdout
            use = {"engine_gib": 0.0, "trainer_gib": 0.0}
            for line in filter(None, q.splitlines()):
                pid, mib = (x.strip() for x in line.split(","))
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                except OSError:
                    continue
                use["engine_gib" if "sglang" in cmd else "trainer_gib"] += float(mib) / 1024
            self.peak = {k: max(v, use[k]) for k, v in self.peak.items()}

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def stage3_dapo(out: Path) -> dict:
    import torch

    path = _model(out, "qwen2.5-0.5b-shape", **QWEN_HF)
    data = out / "toy_train.jsonl"  # the toy recipe's prompts (examples/toy/run.py makes the same rows)
    data.write_text("".join(json.dumps({"question": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                            for a in range(5) for b in range(5)))
    modes = ["disk"] + (["distributed"] if torch.cuda.device_count() >= 2 else [])
    numbers, ok, detail = {}, True, []
    for mode in modes:
        run_dir = out / f"dapo_{mode}"
        cmd = [sys.executable, "-m", "dapo_megatron.cli", "train", "--config", str(REPO / "examples/toy/config.yaml"),
               f"model.path={path}", f"data.path={data}", "model.fp8=e4m3", "rollout.backend=sglang",
               "rollout.colocate=true", f"rollout.weight_sync={mode}", "actor.recompute_old_logprobs=true",
               "rollout.sglang_mem_fraction_static=0.3", "trainer.num_steps=3", "actor.use_distributed_optimizer=true",
               f"trainer.run_dir={run_dir}", "trainer.tensorboard=false"]
        with GpuMemory() as mem:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()] \
            if (run_dir / "metrics.jsonl").is_file() else []
        steps_ok = proc.returncode == 0 and len(metrics) == 3
        ok = ok and steps_ok
        gaps = [m.get("rollout/train_infer_logprob_diff_max") for m in metrics]
        numbers.update({f"{mode}_steps": len(metrics), f"{mode}_logprob_gap_max": max(filter(None, gaps), default=-1),
                        f"{mode}_engine_peak_gib": mem.peak["engine_gib"],
                        f"{mode}_trainer_peak_gib": mem.peak["trainer_gib"]})
        for key in ("time/train_s", "time/sync_s", "time/step_s"):
            vals = [m[key] for m in metrics[1:] if key in m]  # step 1 includes warm-up
            if vals:
                numbers[f"{mode}_{key.split('/')[1]}"] = sum(vals) / len(vals)
        if not steps_ok:
            detail.append(f"{mode}: rc={proc.returncode}\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}")
    detail.append("tensor mode needs the engine in the trainer's process (embedded engine): measured in stage 5; "
                  "real SGLang's HTTP update_weights_from_tensor is not implemented by rollout/weight_sync.py")
    if "distributed" not in modes:
        detail.append("distributed (NCCL) mode skipped: NCCL cannot put the trainer and the engine on one GPU")
    return {"ok": ok, "numbers": numbers, "detail": "\n".join(detail)}


def stage4_mfu(out: Path) -> dict:
    import torch

    from dapo_megatron import parallel
    from dapo_megatron.models.builder import ModelConfig, build_model

    parallel.initialize()
    path = _model(out, "qwen2.5-0.5b-shape", **QWEN_HF)
    model, _ = build_model(ModelConfig(path=str(path)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    b, s = 8, 1024
    tokens = torch.randint(0, QWEN25_05B.vocab, (b, s), device="cuda")
    pos = torch.arange(s, device="cuda")[None].expand(b, -1)
    times = []
    for i in range(6):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(tokens, pos, None).float().logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    step_s = sum(times[2:]) / len(times[2:])
    tps = b * s / step_s
    peak = peak_flops_for(torch.cuda.get_device_name())
    numbers = {"tokens_per_s": tps, "step_s": step_s, "mfu": mfu(QWEN25_05B, s, tps, peak),
               "train_flops_per_token": train_flops_per_token(QWEN25_05B, s), "peak_flops": peak}
    return {"ok": numbers["mfu"] > 0.05, "numbers": numbers,
            "detail": f"fwd+bwd+AdamW of the TE-spec bf16 GPTModel, batch {b} x {s}; formula in tools/gpu_check.py"}


def stage5_sync_gbps(out: Path) -> dict:
    import torch

    from dapo_megatron.rollout.client import RolloutClient
    from dapo_megatron.rollout.engine import Engine
    from dapo_megatron.rollout.weight_sync import make_weight_sync

    path = _model(out, "qwen2.5-0.5b-shape", **QWEN_HF)
    engine = Engine(path, device="cuda", dtype=torch.bfloat16)
    try:
        named = [(n, p.detach().clone()) for n, p in engine.model.named_parameters()]
        gb = sum(t.numel() * t.element_size() for _, t in named) / 1e9
        numbers = {"model_gb": gb}
        sync = make_weight_sync("tensor", RolloutClient(engine=engine))
        sync.sync(named)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        sync.sync(named)
        torch.cuda.synchronize()
        numbers["tensor_gbps"] = gb / (time.perf_counter() - t0)
    finally:
        engine.shutdown()
    stage3 = out / "stage3_dapo.json"
    got = json.loads(stage3.read_text())["numbers"] if stage3.is_file() else {}
    for mode in ("disk", "distributed"):
        if f"{mode}_sync_s" in got:
            numbers[f"{mode}_gbps"] = gb / got[f"{mode}_sync_s"]
    return {"ok": numbers["tensor_gbps"] > 0, "numbers": numbers,
            "detail": "tensor: in-process embedded engine on the GPU; disk/distributed: stage 3's sync time per step "
                      "(includes pause/flush/continue)"}


STAGES = {f.__name__: f for f in (stage1_gpu_tests, stage2_te_fp8, stage3_dapo, stage4_mfu, stage5_sync_gbps)}


def main():
    name, out = sys.argv[1], Path(sys.argv[2])
    os.environ.setdefault("PYTHONPATH", str(REPO))
    try:
        result = STAGES[name](out)
    except Exception as e:  # noqa: BLE001 - the stage fails with the cause in its report
        import traceback

        result = {"ok": False, "numbers": {}, "detail": f"{e!r}\n{traceback.format_exc()[-3000:]}"}
    (out / f"{name}.json").write_text(json.dumps(result, default=float))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
