"""Plot the tools demo: accuracy per DAPO step with the calculator and without it (docs/tools_toy/accuracy.png).

    python examples/tools_toy/plot.py runs/tools_toy runs/tools_toy_notools [docs/tools_toy/accuracy.png]
"""
import json
import sys
from pathlib import Path


def load(run: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def main(argv):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_tool, without = load(argv[0]), load(argv[1])
    out = Path(argv[2]) if len(argv) > 2 else Path("docs/tools_toy/accuracy.png")
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for rows, label in ((with_tool, "with the calculator"), (without, "without tools (multi_turn.enabled=false)")):
        ax.plot([r["step"] for r in rows], [r.get("rollout/accuracy", float("nan")) for r in rows], label=label)
    ax.plot([r["step"] for r in with_tool], [r.get("rollout/tool_using_frac", float("nan")) for r in with_tool],
            ":", color="gray", label="responses that call the tool")
    ax.set_xlabel("DAPO step")
    ax.set_ylabel("accuracy (all sampled responses)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("a*b= (a: 2 digits, b: 1 digit), tiny model on CPU")
    ax.legend(loc="upper left", bbox_to_anchor=(0.0, 0.93), fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
