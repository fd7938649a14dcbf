"""One prepared GPU check: TE FP8 layers, real SGLang, weight sync and MFU, at most 10 minutes on one H100/H200.

    python tools/gpu_check.py OUT_DIR                 # sets up a cached venv with the `gpu` extra, then runs stages
    python tools/gpu_check.py OUT_DIR --skip stage1_gpu_tests --venv ~/.cache/dapo_gpu_check/venv
    python tools/gpu_check.py OUT_DIR --dry-run       # CPU: plan, imports, stage 3's runs for 1 and 2 GPUs against
                                                      # the config validation and placement, FLOP formula

Stages run in order, each in its own process under its own time budget (killed at the budget: reported "timeout"),
each with pass/fail and numbers; OUT_DIR gets report.json and report.md (also written after every stage, so a run
cut short still leaves its numbers). Stage bodies are in tools/gpu_check_stages.py and drive the package's own GPU
paths (models/builder.py, rollout/sglang_launcher.py, rollout/weight_sync.py, the trainer CLI), never copies of them.

Model FLOPs: the formula is stated once, in tools/gpu_check_plan.py.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check_plan  # noqa: E402
from gpu_check_plan import (PLAN, QWEN25_05B, ModelShape, Stage, forward_flops_per_token, mfu,  # noqa: E402,F401
                            peak_flops_for, train_flops_per_token)

REPO = Path(__file__).resolve().parents[1]
TOTAL_BUDGET_S = 600
SETUP_BUDGET_S = 150  # a warm pip cache: venv + editable install of the gpu extra
# --------------------------------------------------------------------------- running stages
@dataclass
class Result:
    name: str
    status: str  # pass | fail | timeout | skipped
    seconds: float = 0.0
    budget_s: int = 0
    numbers: dict = field(default_factory=dict)
    detail: str = ""


def run_stage(stage: Stage, cmd: list, out_dir: Path, env=None) -> Result:
    """Run one stage's process under its budget; it writes out_dir/<name>.json ({"ok", "numbers", "detail"})."""
    result_file = out_dir / f"{stage.name}.json"
    result_file.unlink(missing_ok=True)
    log = out_dir / f"{stage.name}.log"
    started = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=stage.budget_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            return Result(stage.name, "timeout", time.monotonic() - started, stage.budget_s,
                          detail=f"killed at its {stage.budget_s}s budget; log {log}")
    seconds = time.monotonic() - started
    got = json.loads(result_file.read_text()) if result_file.is_file() else {}
    ok = rc == 0 and got.get("ok", False)
    tail = "" if ok else "\n".join(log.read_text(errors="replace").splitlines()[-15:])
    return Result(stage.name, "pass" if ok else "fail", seconds, stage.budget_s, got.get("numbers", {}),
                  got.get("detail", "") + (f"\n{tail}" if tail else ""))


def write_report(out_dir: Path, results: list, header: dict):
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps({**header, "stages": [asdict(r) for r in results]}, indent=1))
    lines = [f"# GPU check {header.get('started', '')}", "", f"device: {header.get('device', '?')}", "",
             "| stage | status | s / budget | numbers |", "|---|---|---|---|"]
    for r in results:
        nums = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.numbers.items())
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.0f} / {r.budget_s} | {nums} |")
    lines += ["", "Versions:", "", "```", header.get("versions", ""), "```"]
    for r in results:
        if r.detail:
            lines += ["", f"## {r.name}", "", "```", r.detail.strip(), "```"]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- setup (venv with the gpu extra)
def setup_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    stamp = venv / f".installed-{(REPO / 'setup.py').stat().st_mtime_ns}"
    if not stamp.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-e", f"{REPO}[gpu,test]"], check=True)
        stamp.touch()
    return python


def installed_versions(python) -> str:
    names = ("torch", "megatron-core", "transformer-engine", "transformer_engine_torch", "sglang", "sglang-router",
             "sgl-kernel", "sglang-kernel", "flashinfer-python", "torch-memory-saver", "transformers", "triton")
    freeze = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze"], capture_output=True,
                            text=True).stdout.splitlines()
    return "\n".join(line for line in freeze if line.split("==")[0].lower().replace("_", "-") in
                     {n.replace("_", "-") for n in names})


# --------------------------------------------------------------------------- dry run (CPU, CI)
CPU_IMPORTS = ("dapo_megatron.models.builder", "dapo_megatron.models.weights", "dapo_megatron.rollout.sglang_launcher",
               "dapo_megatron.rollout.weight_sync", "dapo_megatron.rollout.client", "dapo_megatron.train.actor",
               "dapo_megatron.config", "gpu_check_stages")


def dry_run(out_dir: Path, skip: set) -> list:
    import importlib

    results = []
    budgets = sum(s.budget_s for s in PLAN)
    names = [s.name for s in PLAN]
    plan_ok = budgets + SETUP_BUDGET_S <= TOTAL_BUDGET_S and len(set(names)) == len(names)
    results.append(Result("plan", "pass" if plan_ok else "fail", numbers={"stage_budgets_s": budgets,
                          "setup_budget_s": SETUP_BUDGET_S, "total_budget_s": TOTAL_BUDGET_S}))
    sys.path.insert(0, str(Path(__file__).parent))
    failed = []
    for mod in CPU_IMPORTS:
        try:
            importlib.import_module(mod)
        except Exception as e:  # noqa: BLE001 - reported
            failed.append(f"{mod}: {e!r}")
    results.append(Result("imports", "fail" if failed else "pass", numbers={"modules": len(CPU_IMPORTS)},
                          detail="\n".join(failed)))
    if not failed:  # stage 3's runs (1 and 2 GPUs) against the real config validation and placement
        from gpu_check_stages import stage3_plan_check

        got = stage3_plan_check(out_dir)
        results.append(Result("stage3_plan", "pass" if got["ok"] else "fail", numbers=got["numbers"],
                              detail=got["detail"]))
    got = forward_flops_per_token(ModelShape(2, 8, 2, 1, 4, 16, 10), 6)
    results.append(Result("flops_formula", "pass" if got == 2656 else "fail", numbers={"forward_flops": got,
                          "hand_computed": 2656}))
    for stage in PLAN:
        results.append(Result(stage.name, "skipped", budget_s=stage.budget_s, detail="dry run"))
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--skip", default="", help="comma-separated stage names to skip")
    p.add_argument("--venv", type=Path, default=Path.home() / ".cache" / "dapo_gpu_check" / "venv")
    p.add_argument("--no-setup", action="store_true", help="use this interpreter as it is")
    args = p.parse_args(argv)
    skip = {s for s in args.skip.split(",") if s}
    unknown = skip - {s.name for s in PLAN}
    if unknown:
        p.error(f"--skip {','.join(sorted(unknown))}: no such stage; stages are {', '.join(s.name for s in PLAN)}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    header = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "dry_run": args.dry_run,
              "flops_formula": gpu_check_plan.__doc__.split("Model FLOPs")[1].strip()}
    if args.dry_run:
        results = dry_run(args.out_dir, skip)
        write_report(args.out_dir, results, {**header, "device": "none (dry run)"})
        print((args.out_dir / "report.md").read_text())
        return 0 if all(r.status in ("pass", "skipped") for r in results) else 1
    python = Path(sys.executable) if args.no_setup else setup_venv(args.venv)
    header["versions"] = installed_versions(python)
    print(header["versions"], flush=True)
    probe = [str(python), "-c", "import torch; print(torch.cuda.get_device_name())"]
    everything_skipped = skip >= {s.name for s in PLAN}
    header["device"] = ("not probed (every stage skipped)" if everything_skipped else
                        subprocess.run(probe, capture_output=True, text=True).stdout.strip() or "no CUDA device")
    results = []
    for stage in PLAN:
        if stage.name in skip:
            results.append(Result(stage.name, "skipped", budget_s=stage.budget_s, detail="--skip"))
        else:
            cmd = [str(python), str(REPO / "tools" / "gpu_check_stages.py"), stage.name, str(args.out_dir)]
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            results.append(run_stage(stage, cmd, args.out_dir, env))
        print(f"{results[-1].name}: {results[-1].status} ({results[-1].seconds:.0f}s) {results[-1].numbers}",
              flush=True)
        write_report(args.out_dir, results, header)
    return 0 if all(r.status in ("pass", "skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
