"""`dapo-megatron report RUN_DIR`: RUN_DIR/report/index.html, a static page (no server, no network) with
matplotlib plots of metrics.jsonl and a sample browser over the rollout dumps (trainer.dump_rollouts).

It reads what a run writes as it goes (whole lines of metrics.jsonl, whole dump files: both are written atomically
per line / per file), so it works on a run in progress as on a finished one; run it again to refresh.
"""
import errno
import html
import json
import os
from pathlib import Path
from typing import Optional

from .train.rollout_dump import ROLLOUTS_DIR, read_dump

# (file, title, y-label, keys or key prefixes ending in "*"); a panel is drawn when metrics.jsonl has any of them
PANELS = [
    ("reward.png", "Reward and accuracy (all generated responses)", "", ["rollout/reward_mean", "rollout/accuracy"]),
    ("length.png", "Response length", "tokens", ["rollout/response_length_mean", "rollout/response_length_max"]),
    ("truncation.png", "Truncated responses (finish_reason=length)", "fraction", ["rollout/truncation_rate"]),
    ("entropy.png", "Entropy", "nats/token", ["actor/entropy"]),
    ("clip.png", "Clip fractions", "fraction", ["actor/*clipfrac*"]),
    ("grad_norm.png", "Gradient norm", "", ["actor/grad_norm"]),
    ("groups.png", "Prompt groups per step: kept and dropped", "groups",
     ["rollout/groups_kept", "rollout/groups_dropped_*", "rollout/groups_aborted", "rollout/groups_surplus"]),
    ("logprob_gap.png", "Log-prob gap: trainer vs engine (max |diff|)", "nats",
     ["rollout/train_infer_logprob_diff_max", "rollout/*logprob_diff*"]),
    ("time.png", "Time per stage", "seconds", ["time/*"]),
    ("eval.png", "Eval avg@k", "accuracy", ["eval/avg@*"]),
]


def read_metrics(run_dir: Path) -> list[dict]:
    """The whole lines of metrics.jsonl (a run in progress may be writing the last one)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "not a run folder (no metrics.jsonl): give a trainer.run_dir", str(path))
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def panel_keys(patterns: list[str], keys: list[str]) -> list[str]:
    out = []
    for p in patterns:
        if p.endswith("*") or "*" in p:
            head, _, tail = p.partition("*")
            mid = tail.rstrip("*")
            found = [k for k in keys if k.startswith(head) and mid in k[len(head):]]
        else:
            found = [p] if p in keys else []
        out += [k for k in found if k not in out and k != "time/step_s"]
    return out


def plot_panels(rows: list[dict], out: Path) -> list[tuple[str, str]]:
    """One PNG per panel with data; returns (file, title) of those drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for r in rows for k in r if k not in ("step", "time")})
    drawn = []
    for name, title, ylabel, patterns in PANELS:
        chosen = panel_keys(patterns, keys)
        if not chosen:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.2), dpi=80)
        for k in chosen:
            pts = [(r["step"], r[k]) for r in rows if k in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, marker="." if len(pts) < 30 else None)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
        drawn.append((name, title))
    return drawn


def dump_steps(run_dir: Path) -> list[int]:
    folder = run_dir / ROLLOUTS_DIR
    names = sorted(folder.glob("step_*.jsonl.gz")) if folder.is_dir() else []
    return [int(p.name[len("step_"):-len(".jsonl.gz")]) for p in names]


def choose_steps(available: list[int], wanted: Optional[list[int]]) -> list[int]:
    """The steps asked for that have a dump; by default the first, middle and last dumped."""
    if wanted:
        return [s for s in wanted if s in available]
    picks = [available[0], available[len(available) // 2], available[-1]] if available else []
    return sorted(set(picks))


def _groups(records: list[dict]) -> dict:
    groups: dict = {}
    for r in records:
        groups.setdefault((r["kept"], r["group_id"]), []).append(r)
    return groups


def _group_html(group: list[dict], kept: bool) -> str:
    first = group[0]
    why = "kept" if kept else f"dropped: {first.get('drop_reason')}"
    rows = "".join(
        f"<tr><td>{r['index']}</td><td>{r['reward']:.3g}</td><td>{_yes(r['correct'])}</td>"
        f"<td>{html.escape(str(r['finish_reason']))}</td><td>{r['response_length']}</td>"
        f"<td class=text>{html.escape(r['response_text'] or '')}</td></tr>" for r in sorted(group, key=lambda r: r["index"]))
    return (f"<div class='group {'kept' if kept else 'dropped'}'><div class=ghead>group {first['group_id']} "
            f"(row {first.get('prompt_index')}) - {why} - label {html.escape(str(first.get('label')))}</div>"
            f"<pre class=prompt>{html.escape(first['prompt_text'] or '')}</pre>"
            "<table><tr><th>#</th><th>reward</th><th>correct</th><th>finish</th><th>len</th><th>response</th></tr>"
            f"{rows}</table></div>")


def _yes(v) -> str:
    return "-" if v is None else ("yes" if v else "no")


def browser_html(run_dir: Path, steps: list[int], per_side: int) -> str:
    parts = []
    for step in steps:
        groups = _groups(read_dump(run_dir / ROLLOUTS_DIR / f"step_{step:07d}.jsonl.gz"))
        kept = [g for (k, _), g in sorted(groups.items(), key=lambda kv: kv[0][1]) if k][:per_side]
        dropped = [g for (k, _), g in sorted(groups.items(), key=lambda kv: kv[0][1]) if not k][:per_side]
        n_kept = sum(1 for k, _ in groups if k)
        parts.append(
            f"<h3 id=step{step}>Step {step}: {n_kept} kept, {len(groups) - n_kept} dropped groups "
            f"(showing up to {per_side} of each)</h3><div class=sides>"
            f"<div class=side><h4>Kept</h4>{''.join(_group_html(g, True) for g in kept) or '<p>none</p>'}</div>"
            f"<div class=side><h4>Dropped</h4>{''.join(_group_html(g, False) for g in dropped) or '<p>none</p>'}"
            "</div></div>")
    return "".join(parts)


CSS = """body{font-family:sans-serif;margin:1em 2em;color:#222}img{max-width:100%;border:1px solid #ddd}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(480px,1fr));gap:10px}
.sides{display:flex;gap:1em}.side{flex:1;min-width:0}.group{border:1px solid #ccc;margin:.5em 0;padding:.4em}
.kept{border-left:5px solid #2a7}.dropped{border-left:5px solid #c44}.ghead{font-weight:bold;font-size:90%}
table{border-collapse:collapse;font-size:80%;width:100%}td,th{border:1px solid #ddd;padding:2px 4px;
vertical-align:top}.text{white-space:pre-wrap;font-family:monospace}pre.prompt{white-space:pre-wrap;background:#f6f6f6;
margin:.3em 0;font-size:80%}"""


def write_report(run_dir, steps: Optional[list[int]] = None, per_side: int = 3) -> Path:
    """Write RUN_DIR/report/ (PNGs + index.html); returns the page's path."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    drawn = plot_panels(rows, out)
    available = dump_steps(run_dir)
    chosen = choose_steps(available, steps)
    last = rows[-1]["step"] if rows else 0
    plots = "".join(f"<figure><img src='{n}' alt='{html.escape(t)}'></figure>" for n, t in drawn)
    if available:
        links = " ".join(f"<a href='#step{s}'>{s}</a>" for s in chosen)
        samples = (f"<p>Dumped steps: {len(available)} ({available[0]}..{available[-1]}); shown: {links}. "
                   "Pick others with <code>dapo-megatron report RUN_DIR --steps N,M</code>.</p>"
                   + browser_html(run_dir, chosen, per_side))
    else:
        samples = "<p>No rollout dumps in this run: set <code>trainer.dump_rollouts=N</code> to record samples.</p>"
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(run_dir.resolve().name)} - "
            f"dapo_megatron report</title><style>{CSS}</style></head><body>"
            f"<h1>Run {html.escape(str(run_dir))}</h1><p>{len(rows)} steps logged (last: step {last}). "
            "Static page: re-run <code>dapo-megatron report</code> to refresh.</p>"
            f"<h2>Metrics</h2><div class=plots>{plots}</div><h2>Samples</h2>{samples}</body></html>")
    index = out / "index.html"
    tmp = out / "index.html.tmp"
    tmp.write_text(page)
    os.replace(tmp, index)
    return index


def main(argv) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="dapo-megatron report", description="RUN_DIR/report/index.html: plots of "
                                "metrics.jsonl and a browser of the rollout dumps (a static page)")
    p.add_argument("run_dir", help="a trainer.run_dir (finished or in progress)")
    p.add_argument("--steps", default="", help="dumped steps to show, e.g. 10,20 (default: first, middle, last)")
    p.add_argument("--groups", type=int, default=3, help="kept and dropped groups shown per step (each)")
    args = p.parse_args(argv)
    try:
        steps = [int(s) for s in args.steps.split(",") if s.strip()]
    except ValueError:
        p.error(f"--steps {args.steps!r}: give step numbers separated by commas")
    print(f"wrote {write_report(args.run_dir, steps, args.groups)}")
