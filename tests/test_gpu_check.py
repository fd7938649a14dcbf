"""tools/gpu_check.py on CPU: the dry run (plan, CPU imports, FLOP formula), skipping, and the per-stage time bound."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import gpu_check  # noqa: E402
import gpu_check_stages  # noqa: E402


def test_dry_run_passes_and_writes_both_reports(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), str(tmp_path), "--dry-run"],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env={"PYTHONPATH": str(REPO),
                                                                                      "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    status = {s["name"]: s["status"] for s in report["stages"]}
    assert status == {"plan": "pass", "imports": "pass", "stage3_plan": "pass", "flops_formula": "pass",
                      **{s.name: "skipped" for s in gpu_check.PLAN}}
    plan = next(s for s in report["stages"] if s["name"] == "stage3_plan")["numbers"]
    assert plan["modes_1gpu"] == "tensor,disk" and plan["modes_2gpu"] == "tensor,distributed,disk"
    assert plan["distributed_engine_gpu"] == 1
    assert "LM head" in report["flops_formula"] and "| stage4_mfu | skipped |" in (tmp_path / "report.md").read_text()


def test_flop_formula_against_a_hand_computed_config():
    m = gpu_check.ModelShape(layers=2, hidden=8, heads=2, kv_heads=1, head_dim=4, ffn=16, vocab=10)
    # per layer: QKV 2*8*(8+2*4)=256, out proj 2*8*8=128, attention 2*6*8=96, SwiGLU 6*8*16=768; LM head 2*8*10
    assert gpu_check.forward_flops_per_token(m, 6) == 2 * (256 + 128 + 96 + 768) + 160 == 2656
    assert gpu_check.train_flops_per_token(m, 6) == 3 * 2656
    assert gpu_check.mfu(m, 6, tokens_per_s=1000.0, peak_flops=7968e3) == pytest.approx(1.0)
    # Qwen2.5-0.5B at 1024 tokens: ~0.99 GFLOP forward per token (~0.49 B params x 2 + attention)
    assert 0.9e9 < gpu_check.forward_flops_per_token(gpu_check.QWEN25_05B, 1024) < 1.1e9


def test_plan_fits_ten_minutes_and_every_stage_has_a_body_and_a_budget():
    assert sum(s.budget_s for s in gpu_check.PLAN) + gpu_check.SETUP_BUDGET_S <= 600
    assert [s.name for s in gpu_check.PLAN] == list(gpu_check_stages.STAGES)
    assert all(s.budget_s > 0 for s in gpu_check.PLAN)


def test_a_stage_past_its_budget_is_killed_and_reported(tmp_path):
    stage = gpu_check.Stage("hang", 2, "sleeps")
    started = time.monotonic()
    r = gpu_check.run_stage(stage, [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path)
    assert r.status == "timeout" and time.monotonic() - started < 20 and "2s budget" in r.detail
    ok = gpu_check.run_stage(gpu_check.Stage("ok", 30, ""), [sys.executable, "-c", f"import json; open("
                             f"{str(tmp_path / 'ok.json')!r}, 'w').write(json.dumps({{'ok': True, 'numbers': "
                             "{'x': 1.5}}))"], tmp_path)
    assert ok.status == "pass" and ok.numbers == {"x": 1.5}


def test_every_stage_can_be_skipped(tmp_path, monkeypatch):
    names = ",".join(s.name for s in gpu_check.PLAN)
    monkeypatch.setattr(gpu_check, "installed_versions", lambda python: "torch==test")
    assert gpu_check.main([str(tmp_path), "--no-setup", "--skip", names]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert [s["status"] for s in report["stages"]] == ["skipped"] * len(gpu_check.PLAN)
    with pytest.raises(SystemExit):
        gpu_check.main([str(tmp_path), "--skip", "stage9_nope"])


def test_stage3_plan_check_catches_a_run_the_trainer_would_refuse(tmp_path, monkeypatch):
    """The dry run's plan check runs the real config validation and placement: NCCL between a trainer rank and a
    colocated engine on one GPU, or CUDA IPC to two servers, fail it with the trainer's own message."""
    real = gpu_check_stages.stage3_runs

    def colocated_nccl(out, model_path, data, gpu_count, base_port, **kw):
        runs, skipped = real(out, model_path, data, gpu_count, base_port, **kw)
        for run in runs:
            if run.mode == "distributed":
                run.server = None
                run.overrides = [o for o in run.overrides if not o.startswith("rollout.")] + [
                    "rollout.backend=sglang", "rollout.colocate=true", "rollout.weight_sync=distributed"]
            if run.mode == "tensor":
                run.overrides.append("rollout.sglang_num_servers=2")
        return runs, skipped

    monkeypatch.setattr(gpu_check_stages, "stage3_runs", colocated_nccl)
    got = gpu_check_stages.stage3_plan_check(tmp_path)
    assert not got["ok"]
    assert "2 GPU(s), distributed: rollout.weight_sync=distributed with rollout.colocate=true" in got["detail"]
    assert "tensor: rollout.weight_sync=tensor with rollout.backend=sglang needs" in got["detail"]
    assert got["detail"].count("\n") == 2, got["detail"]  # tensor twice (1 and 2 GPUs) + distributed: nothing else
