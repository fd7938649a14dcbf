"""`dapo-megatron report RUN_DIR` (report.py): a static page whose plots load in a real headless browser (Debian's
chromium, installed by .ci/run; skipped with a message where it is absent), on a run in progress as on a finished one.
The browser test's screenshot is docs/report_screenshot.png (refresh: DAPO_REPORT_SCREENSHOT=docs/report_screenshot.png)."""
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from dapo_megatron.report import PANELS, write_report
from dapo_megatron.train.rollout_dump import ROLLOUTS_DIR, RolloutDumper, step_records
from dapo_megatron.types import Sample
from tests.helpers.forked import run_cli

STEPS = 12


def _metrics(step):
    return {"step": step, "time": 0.0, "rollout/reward_mean": -1 + step / 8, "rollout/accuracy": step / 16,
            "rollout/response_length_mean": 6 + math.sin(step), "rollout/response_length_max": 8,
            "rollout/truncation_rate": 0.1, "actor/entropy": 1 / step, "actor/pg_clipfrac_high": 0.01 * step,
            "actor/pg_clipfrac_low": 0.002, "actor/grad_norm": 2 / step, "rollout/groups_kept": 4,
            "rollout/groups_dropped_all_correct": step % 3, "rollout/groups_dropped_all_wrong": 2,
            "rollout/train_infer_logprob_diff_max": 1e-6, "time/rollout_s": 1.0, "time/train_s": 2.0,
            "time/step_s": 3.0, **({"eval/avg@4": step / 20} if step % 4 == 0 else {})}


def _group(gid, answers):
    return [Sample(prompt_ids=[1], response_ids=[2, 3], rollout_logprobs=[-0.1, -0.2], group_id=gid, index=i,
                   prompt_text=f"{gid}+1=", response_text=f"Answer: {a} <b>", label=str(gid + 1),
                   correct=a == gid + 1, reward=1.0 if a == gid + 1 else -1.0, metadata={"row": gid})
            for i, a in enumerate(answers)]


def make_run(run_dir: Path, steps=STEPS, torn=False) -> Path:
    run_dir.mkdir(parents=True)
    lines = "".join(json.dumps(_metrics(s)) + "\n" for s in range(1, steps + 1))
    (run_dir / "metrics.jsonl").write_text(lines + ('{"step": 99, "rollout/rew' if torn else ""))
    dumper = RolloutDumper(run_dir, every=4)
    for step in range(4, steps + 1, 4):
        kept, dropped = _group(step, [step + 1, 0]), _group(step + 1, [0, 0])
        dumper.submit(ROLLOUTS_DIR, step, step_records(step, kept, [kept, dropped], "accuracy"))
    dumper.close()
    return run_dir


def test_report_of_a_run_in_progress(tmp_path):
    run = make_run(tmp_path / "run", torn=True)  # the trainer is writing a line and a dump right now
    (run / ROLLOUTS_DIR / "step_0000016.jsonl.gz.tmp").write_bytes(b"\x1f\x8b half")
    index = write_report(run)
    page = index.read_text()
    assert "12 steps logged (last: step 12)" in page
    assert sorted(p.name for p in index.parent.glob("*.png")) == sorted(p[0] for p in PANELS)
    assert "Step 4: 1 kept, 1 dropped" in page and "dropped: all_wrong" in page
    assert "Answer: 5 &lt;b&gt;" in page  # response text escaped, not markup
    assert "id=step8" in page and "id=step12" in page


def test_cli_report_and_its_one_line_error(tmp_path):
    run = make_run(tmp_path / "run")
    rc, out, err = run_cli(["report", run, "--steps", "8"], timeout=120)
    assert rc == 0, err
    page = (run / "report" / "index.html").read_text()
    assert "id=step8" in page and "id=step4" not in page
    rc, out, err = run_cli(["report", tmp_path / "nothing"], timeout=60)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "no metrics.jsonl" in err, err


CHECK = """<script>window.addEventListener('load', () => document.body.setAttribute('data-images',
JSON.stringify([...document.images].map(i => [i.getAttribute('src'), i.naturalWidth, i.naturalHeight]))));</script>"""


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("no chromium here (Debian: apt-get install chromium; .ci/run installs it): the report's browser "
                "test did not run")


def test_report_plots_load_in_headless_chromium(tmp_path):
    browser = _chromium()
    index = write_report(make_run(tmp_path / "run"))
    check = index.with_name("check.html")  # beside index.html: the same relative image paths
    check.write_text(index.read_text().replace("</body>", CHECK + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
             "--virtual-time-budget=10000", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([browser, *flags, "--dump-dom", check.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    start = dom.index('data-images="') + len('data-images="')
    images = json.loads(dom[start:dom.index('"', start)].replace("&quot;", '"'))
    assert len(images) == len(PANELS)
    assert all(w > 0 and h > 0 for _, w, h in images), images  # every plot decoded
    shot = tmp_path / "shot.png"
    subprocess.run([browser, *flags, "--window-size=1280,1600", "--hide-scrollbars", f"--screenshot={shot}",
                    index.as_uri()], capture_output=True, timeout=120)
    assert shot.stat().st_size > 10_000
    if os.environ.get("DAPO_REPORT_SCREENSHOT"):
        shutil.copy(shot, os.environ["DAPO_REPORT_SCREENSHOT"])
