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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from gpu_check_plan import PLAN, QWEN25_05B, mfu, peak_flops_for, train_flops_per_token  # noqa: E402

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


# --------------------------------------------------------------------------- stage 3: DAPO steps per weight-sync mode
NCCL_SKIP = "skipped: needs >= 2 GPUs (NCCL: one rank per device)"
MODE_CAP_S = 95  # one 3-step run: trainer and sglang start-up, 3 steps, shutdown
MODE_MIN_S = 45  # a run is not started with less of the stage budget left


@dataclass
class SyncRun:
    """One `dapo-megatron train` run of stage 3; `server`: SGLangServers kwargs of an engine the stage starts itself
    on a GPU of its own (distributed mode), else the trainer starts its colocated engine."""
    mode: str
    overrides: list
    engine_port: int  # its sglang server's HTTP port (stopped by it after the run, whatever happened)
    env: dict = field(default_factory=dict)
    server: Optional[dict] = None


def stage3_runs(out: Path, model_path, data, gpu_count: int, base_port: int, api_key: str = "gpu-check"):
    """Stage 3's runs in order (tensor first) and the modes skipped, with why. Pure: the dry run checks it."""
    common = [f"model.path={model_path}", f"data.path={data}", "model.fp8=e4m3", "actor.recompute_old_logprobs=true",
              "trainer.num_steps=3", "actor.use_distributed_optimizer=true", "trainer.tensorboard=false"]
    colocated = ["rollout.backend=sglang", "rollout.colocate=true", "rollout.sglang_num_servers=1",
                 "rollout.sglang_tp_size=1", "rollout.sglang_mem_fraction_static=0.3"]
    runs = [SyncRun("tensor", common + colocated + ["rollout.weight_sync=tensor",
                                                    f"rollout.sglang_base_port={base_port}"], base_port)]
    skipped = {}
    if gpu_count >= 2:  # the engine on GPU 1, the trainer (rank 0, LOCAL_RANK 0) on GPU 0
        url = f"http://127.0.0.1:{base_port + 100}"
        runs.append(SyncRun("distributed", common + ["rollout.backend=http", f'rollout.urls=["{url}"]',
                                                     "rollout.weight_sync=distributed"], base_port + 100,
                            env={"DAPO_ROLLOUT_API_KEY": api_key, "DAPO_WEIGHT_SYNC_ADDR": "127.0.0.1"},
                            server={"model_path": str(model_path), "base_gpu_id": 1, "mem_fraction_static": 0.5,
                                    "base_port": base_port + 100, "dtype": "bfloat16", "api_key": api_key}))
    else:
        skipped["distributed"] = NCCL_SKIP
    runs.append(SyncRun("disk", common + colocated + ["rollout.weight_sync=disk",
                                                      f"rollout.sglang_base_port={base_port + 200}"], base_port + 200))
    for run in runs:
        run.overrides.append(f"trainer.run_dir={out / f'dapo_{run.mode}'}")
    return runs, skipped


def stage3_plan_check(out: Path) -> dict:
    """Dry run (CPU): stage 3's runs for 1 and for 2 GPUs pass the config validation and placement a real run starts
    with; the NCCL run puts the engine on GPU 1 (started by the stage) and the one trainer rank on GPU 0; the stage
    budget holds the runs one GPU must do (tensor, disk)."""
    from transformers import Qwen2Config

    from dapo_megatron.config import build_config, validate
    from dapo_megatron.placement import make_plan
    from dapo_megatron.rollout.sglang_launcher import SGLangServers

    model, data = out / "plan_model", out / "plan_data.jsonl"  # config.json only: the checks read no weights
    Qwen2Config(architectures=["Qwen2ForCausalLM"], **QWEN_HF).save_pretrained(model)
    data.write_text(json.dumps({"question": "1+1=", "answer": "2"}) + "\n")
    numbers, problems = {}, []
    for gpus, expect in ((1, ["tensor", "disk"]), (2, ["tensor", "distributed", "disk"])):
        runs, skipped = stage3_runs(out, model, data, gpus, base_port=31000)
        numbers[f"modes_{gpus}gpu"] = ",".join(r.mode for r in runs)
        if [r.mode for r in runs] != expect or (gpus == 1 and skipped.get("distributed") != NCCL_SKIP):
            problems.append(f"{gpus} GPU(s): runs {[r.mode for r in runs]}, skipped {skipped}; expected {expect}")
        for run in runs:
            try:
                cfg = build_config(str(REPO / "examples/toy/config.yaml"), run.overrides)
                validate(cfg, 1)
                make_plan(cfg, 1, 1)  # one trainer rank on GPU 0 (a colocated engine shares it)
            except ValueError as e:
                problems.append(f"{gpus} GPU(s), {run.mode}: {e}")
                continue
            if run.server:
                cmd = SGLangServers(**run.server, log_dir=out).server_command(0)
                engine_gpu = int(cmd[cmd.index("--base-gpu-id") + 1])
                numbers["distributed_engine_gpu"] = engine_gpu
                if engine_gpu != 1 or cfg.rollout.backend != "http" or \
                        cfg.rollout.urls != [f"http://127.0.0.1:{run.engine_port}"]:
                    problems.append(f"distributed: engine on GPU {engine_gpu} at {cfg.rollout.urls}; expected GPU 1 "
                                    f"at port {run.engine_port}, the trainer (backend http) on GPU 0")
    budget = next(s.budget_s for s in PLAN if s.name == "stage3_dapo")
    numbers.update({"stage3_budget_s": budget, "mode_cap_s": MODE_CAP_S})
    if 2 * MODE_CAP_S > budget - 5 or MODE_MIN_S > MODE_CAP_S:
        problems.append(f"stage 3's {budget}s budget does not hold two runs of {MODE_CAP_S}s (tensor, disk)")
    return {"ok": not problems, "numbers": numbers, "detail": "\n".join(problems)}


def _kill_servers_on(port: int):
    """A trainer killed at its time box leaves its sglang server (own session) behind: stop it by its port."""
    import signal

    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"sglang.launch_server" not in argv or b"--port" not in argv:
            continue
        if argv[argv.index(b"--port") + 1] == str(port).encode():
            try:
                group = os.getpgid(int(cmdline.parent.name))
                if group != os.getpgid(0):
                    os.killpg(group, signal.SIGKILL)
            except OSError:
                pass


def _dapo_run(run: SyncRun, out: Path, timeout_s: float) -> tuple[dict, str]:
    """One time-boxed training run; (numbers, "" or what failed with the log tail)."""
    from dapo_megatron.rollout.sglang_launcher import SGLangServers

    m, started, rc, error, log = run.mode, time.monotonic(), None, "", out / f"dapo_{run.mode}.log"
    cmd = [sys.executable, "-m", "dapo_megatron.cli", "train", "--config", str(REPO / "examples/toy/config.yaml"),
           *run.overrides]
    servers, mem = None, GpuMemory()
    try:
        with mem, open(log, "w") as f:
            if run.server:
                servers = SGLangServers(**run.server, log_dir=out / f"sglang_{m}", startup_timeout_s=timeout_s)
                servers.start()
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **run.env},
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=max(1.0, timeout_s - (time.monotonic() - started)))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
    except Exception as e:  # noqa: BLE001 - the engine of this run did not start: reported, the next run goes on
        error = f"{e!r}"[:2000]
    finally:
        _kill_servers_on(run.engine_port)
        if servers is not None:
            servers.shutdown()
    run_dir = Path(run.overrides[-1].split("=", 1)[1])
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()] \
        if (run_dir / "metrics.jsonl").is_file() else []
    numbers = {f"{m}_steps": len(metrics), f"{m}_engine_peak_gib": mem.peak["engine_gib"],
               f"{m}_trainer_peak_gib": mem.peak["trainer_gib"],
               f"{m}_logprob_gap_max": max(filter(None, (x.get("rollout/train_infer_logprob_diff_max")
                                                         for x in metrics)), default=-1)}
    for key, name in (("time/train_s", "train_s"), ("time/sync_s", "sync_s"), ("time/step_s", "step_s"),
                      ("time/engine_weight_update_s", "engine_update_s"), ("sync/gb", "sync_gb"),
                      ("sync/gb_stage0", "sync_gb")):
        vals = [x[key] for x in metrics[1:] if key in x]  # step 1 includes warm-up
        if vals:
            numbers[f"{m}_{name}"] = sum(vals) / len(vals)
    if rc == 0 and len(metrics) == 3:
        return numbers, ""
    why = f"engine did not start: {error}" if error else "timeout" if rc is None else f"rc={rc}"
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:]) if log.is_file() else ""
    return numbers, f"{m}: {why} after {time.monotonic() - started:.0f}s\n{tail}"


def stage3_dapo(out: Path) -> dict:
    import torch


    deadline = time.monotonic() + next(s.budget_s for s in PLAN if s.name == "stage3_dapo") - 5
    path = _model(out, "qwen2.5-0.5b-shape", **QWEN_HF)
    data = out / "toy_train.jsonl"  # the toy recipe's prompts (examples/toy/run.py makes the same rows)
    data.write_text("".join(json.dumps({"question": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                            for a in range(5) for b in range(5)))
    from dapo_megatron.rollout.sglang_launcher import free_port_block
    runs, skipped = stage3_runs(out, path, data, torch.cuda.device_count(), base_port=free_port_block(300))
    numbers, ok, detail = {}, True, []
    for run in runs:
        left = deadline - time.monotonic()
        if left < MODE_MIN_S:
            skipped[run.mode] = f"skipped: stage budget ({left:.0f}s left)"
            continue
        got, failure = _dapo_run(run, out, min(MODE_CAP_S, left))
        numbers.update(got)
        ok = ok and not failure
        detail += [failure] if failure else []
    numbers.update({f"{mode}_status": why for mode, why in skipped.items()})
    ok = ok and "tensor" not in skipped
    detail.append("tensor: CUDA IPC handles to the colocated sglang server (/update_weights_from_tensor); disk: "
                  "safetensors + /update_weights_from_disk; distributed: NCCL broadcast to an engine on GPU 1")
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
            "detail": f"fwd+bwd+AdamW of the TE-spec bf16 GPTModel, batch {b} x {s}; formula in "
                      f"tools/gpu_check_plan.py"}


def stage5_sync_gbps(out: Path) -> dict:
    """GB/s per mode from stage 3's runs against the real sglang server (steps 2-3): bytes the trainer streamed
    over the step's sync time (stream + engine load + session), and over the engine update alone where known."""
    stage3 = out / "stage3_dapo.json"
    if not stage3.is_file():
        return {"ok": False, "numbers": {}, "detail": "needs stage 3's numbers (stage3_dapo.json); run stage 3"}
    got, numbers = json.loads(stage3.read_text())["numbers"], {}
    for mode in ("tensor", "distributed", "disk"):
        if f"{mode}_status" in got:
            numbers[f"{mode}_gbps"] = got[f"{mode}_status"]
        elif got.get(f"{mode}_sync_gb") and got.get(f"{mode}_sync_s"):
            numbers[f"{mode}_gbps"] = got[f"{mode}_sync_gb"] / got[f"{mode}_sync_s"]
            if got.get(f"{mode}_engine_update_s"):
                numbers[f"{mode}_engine_update_gbps"] = got[f"{mode}_sync_gb"] / got[f"{mode}_engine_update_s"]
    ok = isinstance(numbers.get("tensor_gbps"), float) and numbers["tensor_gbps"] > 0
    return {"ok": ok, "numbers": numbers,
            "detail": "Qwen2.5-0.5B shape, bf16 HF tensors; sync_s = the loop's time/sync_s (Megatron -> HF stream, "
                      "buckets, engine load, pause/flush/continue); distributed counts stage 0's bytes"}


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
