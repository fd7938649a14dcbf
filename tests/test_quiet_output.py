"""User-facing commands print no library notices to stderr (dapo_megatron/quiet.py), on whichever stack runs the tests
(CI runs the suite on Python 3.11 + megatron-core 0.16.1 and on Python 3.12 + megatron-core 0.19.2).

A short `make demo`-config training run with a checkpoint save (also with the GPU's bf16 + distributed
optimizer), a conversion and a refused conversion run
as subprocesses of this interpreter (sys.executable). What may reach stderr is listed: our rollout progress line and
transformers' weight-loading progress bar; anything else (a megatron-core warning, a logging record) fails the test.
"""
import json
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from dapo_megatron import quiet
from dapo_megatron.models.tiny import make_tiny_hf_model

REPO = Path(__file__).resolve().parents[1]
ALLOWED = re.compile(r"^(rollout \d+: kept .*|(Loading weights|Writing model shards): .*|)$")


def _cli(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "dapo_megatron.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=REPO)
    return proc.returncode, proc.stdout, proc.stderr


def _noise(err: str) -> list:
    return [line for line in err.splitlines() if not ALLOWED.match(line.strip())]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    t = tmp_path_factory.mktemp("quiet")
    hf = make_tiny_hf_model(t / "hf", "qwen2.5", seed=0)  # tied embeddings
    untied = t / "cfg_untied"
    untied.mkdir()
    cfg = json.loads((hf / "config.json").read_text())
    (untied / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    data = t / "train.jsonl"
    data.write_text("".join(json.dumps({"question": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                            for a in range(3) for b in range(3)))
    train = ["train", "--config", "examples/toy/config.yaml", f"model.path={hf}", f"data.path={data}",
             "trainer.num_steps=2", "trainer.save_interval=1", "rollout.rollout_batch_size=4",
             "rollout.n_samples_per_prompt=4", "actor.global_batch_size=16", "actor.micro_batch_size=8",
             "dynamic_sampling.enable=false"]
    return {
        "train": _cli(*train, f"trainer.run_dir={t / 'run'}"),
        # the GPU defaults (bf16, distributed optimizer) take other megatron and torch code paths
        "train_gpu_precision": _cli(*train, f"trainer.run_dir={t / 'run_gpu'}", "actor.bf16=true",
                                    "actor.use_distributed_optimizer=true"),
        "to_megatron": _cli("convert", "hf-to-megatron", "--hf-dir", hf, "--save-dir", t / "mg"),
        # refused after the model is built: the checkpoint has no output layer for an untied config
        "refused": _cli("convert", "megatron-to-hf", "--load-dir", t / "mg", "--save-dir", t / "refused",
                        "--hf-config", untied),
    }


@pytest.mark.parametrize("name", ["train", "train_gpu_precision", "to_megatron"])
def test_normal_runs_print_no_library_notices(runs, name):
    rc, out, err = runs[name]
    assert rc == 0, err[-4000:]
    assert _noise(err) == [], err[-4000:]


def test_refused_conversion_is_exactly_one_line(runs):
    rc, _, err = runs["refused"]
    assert rc == 2, err[-4000:]
    assert err.startswith("dapo-megatron convert: checkpoint error: ") and err.count("\n") == 1, err[-4000:]
    assert "'output_layer.weight' is missing" in err


def test_only_the_listed_notices_are_dropped(capsys):
    """The filters match exact messages: another record on the same megatron logger, another warning from megatron,
    still reach the user."""
    quiet.install()
    name, prefix, _ = quiet.LOG_NOTICES[0]
    logger = logging.getLogger(name)
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep()
    logger.addHandler(handler)
    try:
        logger.warning(prefix + " (listed)")
        logger.warning("a real megatron problem")
    finally:
        logger.removeHandler(handler)
    assert records == ["a real megatron problem"]
    examples = [  # one real message per WARNING_NOTICES entry, from the module Python attributes it to
        ("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.", UserWarning,
         "megatron.core.optimizer"),
        ("Apex is not installed. Falling back to Torch Norm", UserWarning, "megatron.core.models.backends"),
        ("full scope is deprecated. Use empty cuda_graph_modules to capture the whole layer.", UserWarning,
         "megatron.core.transformer.transformer_config"),
        ("MimoModelConfig is experimental and still under active development.", UserWarning,
         "megatron.core.models.mimo.config.base_configs"),
        ("`torch.distributed.reduce_scatter_tensor` is deprecated. Please use `torch.distributed.reduce_scatter_single`"
         " instead.", FutureWarning, "torch.distributed.c10d_logger"),
        ("Please use DTensor instead and we are deprecating ShardedTensor.", FutureWarning,
         "dapo_megatron.parallel.cpu_compat"),
    ]
    assert len(examples) == len(quiet.WARNING_NOTICES)
    kept = [("another megatron warning", UserWarning, "megatron.core.x"),
            (examples[0][0], UserWarning, "mylib"),  # the same text from another library
            (examples[4][0], FutureWarning, "mylib")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet.filter_warnings()  # in front of "always", as install() puts them in front of the defaults
        for message, category, module in examples + kept:
            warnings.warn_explicit(message, category, "x.py", 1, module=module)
    assert [str(w.message) for w in caught] == [k[0] for k in kept]
