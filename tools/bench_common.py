"""Shared pieces of the side-by-side benchmarks (bench_step, bench_rollout_peers, bench_scaling).

Imported by the peer runners too (TRL, vLLM), which run in their own virtual environments without this package:
top-level imports are the standard library only.

The workload is built so that every framework generates exactly the same number of tokens: a numeric word-level
tokenizer whose end-of-sequence token has an id outside the model's vocabulary, so no sampler can ever emit it and
every response runs to max_new_tokens, without any framework-specific `ignore_eos` switch.
"""
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAD, UNK = "<pad>", "<unk>"
WORDS = ["+", "=", "?"]


# ---- workload -------------------------------------------------------------------------------------------
def model_shape(hidden: int = 256, layers: int = 4, vocab: int = 32768) -> dict:
    """Qwen2.5-style shape overrides: 64-dim heads, 2:1 GQA, 11/4 MLP ratio (as Qwen2.5-0.5B)."""
    return {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": hidden * 11 // 4,
            "num_hidden_layers": layers, "num_attention_heads": max(hidden // 64, 1),
            "num_key_value_heads": max(hidden // 128, 1), "max_position_embeddings": 4096}


def write_numeric_tokenizer(out_dir: Path, vocab: int) -> None:
    """Word-level tokenizer: pad, unk, + = ?, then the numbers 0.. filling `vocab` ids; EOS is id `vocab`."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    words = [PAD, UNK, *WORDS] + [str(i) for i in range(vocab - 2 - len(WORDS))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken("<eos>", special=True, normalized=False)])  # id == vocab: never sampled
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (out_dir / f).unlink(missing_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096, "bos_token": None,
        "eos_token": "<eos>", "pad_token": PAD, "unk_token": UNK, "clean_up_tokenization_spaces": False}, indent=1))


def make_model(out_dir: Path, hidden: int = 256, layers: int = 4, vocab: int = 32768, seed: int = 0) -> Path:
    """Random-init Qwen2.5-style HF folder with the numeric tokenizer (main venv only: uses dapo_megatron)."""
    from dapo_megatron.models.tiny import make_tiny_hf_model

    out_dir = Path(out_dir)
    make_tiny_hf_model(out_dir, "qwen2.5", seed=seed, **model_shape(hidden, layers, vocab),
                       bos_token_id=None, eos_token_id=vocab, pad_token_id=0)
    write_numeric_tokenizer(out_dir, vocab)
    gen = out_dir / "generation_config.json"
    if gen.is_file():  # keep generation defaults neutral: the benchmarks pass their own sampling settings
        cfg = json.loads(gen.read_text())
        cfg.update({"eos_token_id": vocab, "pad_token_id": 0, "bos_token_id": None})
        gen.write_text(json.dumps(cfg, indent=1))
    return out_dir


PROMPT_TERMS = 12
PROMPT_TOKENS = 4 * PROMPT_TERMS  # 3 digits (Qwen's pre-tokenizer splits digits) + "+" or "=" per term


def make_prompts(path: Path, n: int, seed: int = 0) -> list[dict]:
    """`n` rows {question: "a + b + ... =", answer} of exactly PROMPT_TOKENS tokens each."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        nums = [rng.randrange(100, 1000) for _ in range(PROMPT_TERMS)]
        rows.append({"question": " + ".join(map(str, nums)) + " =", "answer": str(sum(nums))})
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def check_prompts(model_dir: Path, prompts_path: Path) -> None:
    """Every prompt must be PROMPT_TOKENS long under the model's tokenizer: the trained-token counts rely on it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    for line in Path(prompts_path).read_text().splitlines():
        n = len(tok.encode(json.loads(line)["question"], add_special_tokens=False))
        if n != PROMPT_TOKENS:
            raise RuntimeError(f"benchmark prompt has {n} tokens, expected {PROMPT_TOKENS}: tokenizer changed?")


def parity_verifier(response: str, ground_truth: str) -> bool:
    """Rule reward of the benchmark: the last number of the response has the answer's parity (about half right)."""
    words = [w for w in response.split() if w.isdigit()]
    return bool(words) and int(words[-1]) % 2 == int(ground_truth) % 2


# ---- measurement ----------------------------------------------------------------------------------------
class TreeMemory:
    """Peak memory of a process and all its descendants, sampled every `interval` s.

    Two sums: RSS (counts pages shared by forked children once per process, so a fork looks like a copy) and PSS
    (each shared page split among its sharers: the memory the tree really holds). Reported in GiB.
    """

    def __init__(self, pid: int, interval: float = 0.2):
        import psutil

        self.root, self.interval = psutil.Process(pid), interval
        self.peak_rss = self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                return
            rss = pss = 0
            for p in procs:
                try:
                    info = p.memory_full_info()
                    rss, pss = rss + info.rss, pss + info.pss
                except psutil.Error:
                    pass
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self._stop.wait(self.interval)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"peak_rss_gib": self.peak_rss / 2 ** 30, "peak_pss_gib": self.peak_pss / 2 ** 30}


def run_measured(cmd: list, env: dict, log_path: Path, timeout: float) -> tuple[int, float, dict]:
    """Run `cmd`, its output to `log_path`; returns (exit code, wall seconds, TreeMemory peaks)."""
    with open(log_path, "w") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        mem = TreeMemory(proc.pid)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        return rc, time.perf_counter() - start, mem.stop()


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return (xs[n // 2] + xs[(n - 1) // 2]) / 2 if n else float("nan")


def machine_line() -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return f"{os.cpu_count()} CPU cores, {mem:.0f} GiB RAM, load average (1/5/15 min) {load}"


def ensure_venv(path: Path, packages: list, uninstall: tuple = (), check: str = "") -> Path:
    """Create a separate virtual environment with `packages` (once); returns its python. Never touches .venv."""
    path = Path(path)
    python = path / "bin" / "python"
    if python.is_file() and (not check or subprocess.call([str(python), "-c", check]) == 0):
        return python
    if not python.is_file():
        subprocess.check_call([sys.executable, "-m", "venv", str(path)])
    print(f"installing {' '.join(packages)} into {path} (once)", flush=True)
    subprocess.check_call([str(python), "-m", "pip", "install", "-q", *packages])
    if uninstall:
        subprocess.call([str(python), "-m", "pip", "uninstall", "-y", "-q", *uninstall])
    return python


# Frames that only forward a call (the CPU device shim, torch's dispatch helpers): time is charged to their caller.
_PASS_THROUGH = ("cpu_compat.py", "torch/overrides.py", "torch/autograd/function.py", "torch/_tensor.py",
                 "torch/nn/modules/module.py", "torch/autograd/graph.py", "torch/autograd/__init__.py")


def pyspy_summary(raw_path: Path, phases: dict, within: str = "", top: int = 12) -> str:
    """Read a py-spy `--format raw --native` file (collapsed stacks).

    Prints the share of samples under each phase (`phases` maps a label to a substring of a frame), then, for the
    samples under `within` (all if empty), the hottest native leaf functions and the Python lines that called them.
    """
    stacks = []
    for line in Path(raw_path).read_text().splitlines():
        frames, _, count = line.rpartition(" ")
        if frames and count.isdigit():
            stacks.append((frames.split(";"), int(count)))
    total = sum(c for _, c in stacks) or 1
    lines = [f"py-spy: {total} samples (active threads of all processes); share of all samples under:"]
    for label, needle in phases.items():
        n = sum(c for f, c in stacks if any(needle in x for x in f))
        lines.append(f"  {label:<34}{100 * n / total:5.1f}%")
    scope = [(f, c) for f, c in stacks if not within or any(within in x for x in f)]
    n_scope = sum(c for _, c in scope) or 1
    native, python = {}, {}
    for f, c in scope:
        leaf = f[-1].split(" (")[0][:90]
        native[leaf] = native.get(leaf, 0) + c
        py = [x for x in f if ".py:" in x and not any(p in x for p in _PASS_THROUGH)]
        caller = py[-1] if py else "?"
        python[caller] = python.get(caller, 0) + c
    for title, table in (("native leaf functions", native), ("Python lines (self + native callees)", python)):
        lines.append(f"  {title}, share of {within or 'all'} samples:")
        for name, c in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"    {100 * c / n_scope:5.1f}%  {name}")
    return "\n".join(lines)


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path
