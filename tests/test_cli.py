"""The CLI's error boundary: every user error is one line naming the thing and the fix, exit 2, no traceback."""
import json
import shutil
from pathlib import Path

import pytest

from dapo_megatron.models.tiny import make_tiny_hf_model
from tests.helpers.forked import run_cli

REPO = Path(__file__).resolve().parents[1]


def cli(*args, env=None, timeout=300):
    """`dapo-megatron ARGS` as a process of its own: (exit code, stdout, stderr)."""
    return run_cli(args, env=env, timeout=timeout)


def assert_one_line(rc, out, err, pattern):
    import re

    assert rc == 2, (rc, out[-2000:], err[-4000:])
    assert "Traceback" not in out + err, err[-4000:]
    lines = [line for line in err.splitlines() if line.startswith("dapo-megatron ") or line.startswith("error: ")]
    assert len(lines) == 1, err[-4000:]
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    hf = make_tiny_hf_model(root / "hf", "qwen2.5", seed=1)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"question": f"{a}+1=", "answer": str(a + 1)}) + "\n" for a in range(8)))
    return root, hf, data


def _args(toy, **over):
    root, hf, data = toy
    args = {"model.path": hf, "data.path": data, "trainer.run_dir": root / "run", "rollout.rollout_batch_size": 4,
            "rollout.n_samples_per_prompt": 4, "actor.global_batch_size": 8, "actor.micro_batch_size": 4,
            "actor.lr": "1e-6", **over}
    return [f"{k}={v}" for k, v in args.items()]


def test_help_lists_commands_and_exits_0():
    rc, out, err = cli("--help")
    assert rc == 0 and all(c in out for c in ("train", "eval", "serve", "convert")), (out, err)
    rc, out, err = cli()
    assert rc == 2 and "usage: dapo-megatron" in out
    rc, out, err = cli("trian")
    assert rc != 0 and "unknown command 'trian'" in err and "Traceback" not in err


def _bad_data(root):
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = {"malformed.jsonl": '{"question": "a", "answer": "1"}\n{"question": \n',
             "no_answer.jsonl": '{"question": "a", "answer": "1"}\n{"question": "b"}\n',
             "empty_answer.jsonl": '{"question": "a", "answer": ""}\n',
             "empty.jsonl": ""}
    for name, text in files.items():
        (root / name).write_text(text)
    pq.write_table(pa.Table.from_pylist([{"problem": "a", "solution": "1"}]), root / "columns.parquet")
    return root


@pytest.mark.parametrize("name, pattern", [
    ("malformed.jsonl", r"data error: .*malformed\.jsonl, line 2: not valid JSON"),
    ("no_answer.jsonl", r"data error: .*no_answer\.jsonl, line 2: missing field 'answer'"),
    ("empty_answer.jsonl", r"data error: .*empty_answer\.jsonl, line 1: field 'answer' is empty"),
    ("empty.jsonl", r"data error: .*empty\.jsonl: the file has no rows"),
    ("columns.parquet", r"data error: .*columns\.parquet, row 1: cannot tell the dataset layout"),
])
def test_data_errors_are_one_line_before_any_process_starts(toy, tmp_path, name, pattern):
    path = _bad_data(tmp_path) / name
    # TP=2: the check runs in this process, before the ranks are launched (no "launching" line, no megatron)
    rc, out, err = cli("train", *_args(toy, **{"data.path": path, "parallel.tensor_model_parallel_size": 2}))
    assert_one_line(rc, out, err, pattern)
    assert "launching" not in out


def test_config_and_yaml_errors(toy, tmp_path):
    assert_one_line(*cli("train", *_args(toy, **{"actor.lrr": 1})), r"config error: unknown config key actor\.lrr")
    bad = tmp_path / "bad.yaml"
    bad.write_text("actor: [unclosed\n")
    assert_one_line(*cli("train", "--config", bad), r"config error: .*bad\.yaml is not valid YAML")
    assert_one_line(*cli("train", "--config", tmp_path / "none.yaml"), r"config file .*none\.yaml not found")
    assert_one_line(*cli("eval", *_args(toy)), r"config error: eval\.path is required")
    assert_one_line(*cli("eval", *_args(toy, **{"model.path": tmp_path})), r"model\.path=.* has no config\.json")
    rc, out, err = cli("train", *_args(toy, **{"actor.lrr": 1}), env={"DAPO_DEBUG": "1"})
    assert rc != 0 and "Traceback" in err and "ConfigError" in err  # the debug switch shows the traceback
    rc, out, err = cli("--debug", "train", *_args(toy, **{"actor.lrr": 1}))
    assert rc != 0 and "Traceback" in err


def _fake_ckpt(root, n, arch=None, parts=("model", "optim", "rng", "trainer_state.json"), vocab=None):
    from dapo_megatron.models import ckpt_layout as layout

    d = root / layout.iter_name(n)
    for part in parts:
        if part.endswith(".json"):
            (d / part).write_text(json.dumps({"iteration": n}))
        else:
            (d / part).mkdir(parents=True)
            (d / part / "__0_0.distcp").write_bytes(b"x" * 1000)
    layout.write_manifest(d, "train", n, arch=arch, vocab=vocab)
    layout.write_latest(root, d.name)
    return d


def test_checkpoint_errors_are_one_line_up_front(toy, tmp_path):
    from dapo_megatron.models import ckpt_layout as layout

    _, hf, _ = toy
    arch = layout.arch_summary(hf)
    ck = tmp_path / "ck"
    d = _fake_ckpt(ck, 3, arch=arch)
    (d / "model" / "__0_0.distcp").write_bytes(b"x" * 10)  # truncated shard, pinned: refused
    assert_one_line(*cli("train", *_args(toy, **{"trainer.load": d, "trainer.save": tmp_path / "s1"})),
                    r"trainer\.load=.*iter_0000003: iter_0000003 is damaged: model/__0_0\.distcp has 10 bytes")
    d = _fake_ckpt(ck, 4, arch=arch)
    shutil.rmtree(d / "optim")  # missing optimizer state: never replaced by a fresh one
    assert_one_line(*cli("train", *_args(toy, **{"trainer.load": d, "trainer.save": tmp_path / "s2"})),
                    r"iter_0000004 is damaged: optim/__0_0\.distcp is missing")
    (ck / "latest").write_bytes(b"\xff\xfe\x00garbage")  # and every folder damaged: nothing to fall back to
    assert_one_line(*cli("train", *_args(toy, **{"trainer.load": ck, "trainer.save": tmp_path / "s3"})),
                    r"has no complete checkpoint: iter_0000004 is damaged")
    other = _fake_ckpt(tmp_path / "wide", 2, arch={**arch, "hidden_size": 2 * arch["hidden_size"]})
    assert_one_line(*cli("train", *_args(toy, **{"trainer.load": other, "trainer.save": tmp_path / "s4"})),
                    rf"has hidden_size={2 * arch['hidden_size']} but model\.path=.* has hidden_size="
                    rf"{arch['hidden_size']}; set model\.path")
    occupied = tmp_path / "occupied"
    _fake_ckpt(occupied, 5, arch=arch)
    assert_one_line(*cli("train", *_args(toy, **{"trainer.save": occupied})),
                    r"already holds checkpoints \(newest iter_0000005\) and trainer\.load is unset")


def test_convert_of_a_truncated_checkpoint_is_one_line(toy, tmp_path):
    _, hf, _ = toy
    rc, out, err = cli("convert", "hf-to-megatron", "--hf-dir", hf, "--save-dir", tmp_path / "mg")
    assert rc == 0, err
    manifest = json.loads((tmp_path / "mg" / "iter_0000000" / "manifest.json").read_text())
    assert manifest["kind"] == "model" and manifest["arch"]["hidden_size"] > 0  # the converter's kind
    assert manifest["vocab"] == {"padded_vocab_size": 128, "tensor_model_parallel_size": 1,
                                 "make_vocab_size_divisible_by": 128}  # what preflight compares on resume
    shard = max((tmp_path / "mg" / "iter_0000000" / "model").glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:100])
    rc, out, err = cli("convert", "megatron-to-hf", "--load-dir", tmp_path / "mg", "--save-dir", tmp_path / "back")
    assert_one_line(rc, out, err, rf"iter_0000000 is damaged: model/{shard.name} has 100 bytes")
    assert not (tmp_path / "back").exists()


def test_resume_at_a_tp_with_another_padded_vocab_is_one_line_before_launch(toy, tmp_path):
    """The tiny vocabulary (128) pads to 128 rows at TP=1 and to 256 at TP=2: megatron's load would be a shape
    mismatch on every rank; preflight refuses from the manifest, before any rank starts."""
    from dapo_megatron.models import ckpt_layout as layout

    _, hf, _ = toy
    # what `convert hf-to-megatron` (default TP=1) records; test_convert_of_a_truncated_checkpoint checks it does
    _fake_ckpt(tmp_path / "mg", 0, arch=layout.arch_summary(hf), vocab=layout.vocab_record(128, 1, 128))
    rc, out, err = cli("train", *_args(toy, **{"trainer.load": tmp_path / "mg", "trainer.save": tmp_path / "s",
                                               "parallel.tensor_model_parallel_size": 2}))
    assert_one_line(rc, out, err, r"config error: checkpoint .*iter_0000000 has its vocabulary padded to 128 "
                    r"rows \(TP=1, make_vocab_size_divisible_by=128\) but this run pads vocab_size=128 to 256 "
                    r"\(parallel\.tensor_model_parallel_size=2, model\.make_vocab_size_divisible_by=128\); resume at "
                    r"parallel\.tensor_model_parallel_size=1, or set model\.make_vocab_size_divisible_by=64 so the "
                    r"padded sizes agree, or convert it through HF")
    assert "launching" not in out and not (tmp_path / "s").exists()  # no rank started, nothing written


def test_unreachable_server_and_serve_errors(toy, tmp_path):
    root, _, data = toy
    line = assert_one_line(*cli("eval", *_args(toy, **{"eval.path": data, "rollout.backend": "http",
                                                       "rollout.urls": "[http://127.0.0.1:9]", "eval.max_prompts": 1,
                                                       "rollout.request_timeout_s": 5})),
                           r"rollout server error: .*127\.0\.0\.1:9.*; check rollout\.urls")
    assert len(line) < 600
    assert_one_line(*cli("serve", "--model-path", tmp_path / "nope"), r"no config\.json in .*nope")


@pytest.mark.dist
def test_an_error_inside_torchrun_ranks_is_a_line_not_a_traceback_wall(toy, tmp_path):
    """TP=2: `train` launches two ranks; a full disk in their save (on both ranks) prints one line, the CLI exits 2."""
    from test_trainer import _args as trainer_args

    root, hf, data = toy
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    rc, out, err = cli("train", *trainer_args((hf, data), tmp_path / "run", 1, tp=2),
                       env={"DAPO_FAULT": "enospc:save_model@1", "TMPDIR": str(tmp)})
    assert rc == 2, (out[-3000:], err[-6000:])
    assert "Traceback" not in out + err and "ChildFailedError" not in out + err, err[-6000:]
    lines = [x for x in err.splitlines() if x.startswith("dapo-megatron train:")]
    assert len(lines) == 1 and "saving checkpoint iter_0000001" in lines[0] and "disk is full" in lines[0], lines
    assert not list((tmp_path / "run" / "checkpoints").glob("*.tmp"))
    assert not list(tmp.glob("dapo-megatron-errors-*"))  # the ranks' shared note of printed lines is removed


# Every command, one user error each (and a bad command line): `dapo-megatron <cmd>: <kind> error: ...`, exit 2.
STYLE_CASES = [
    ("train", ["--config", "nope.yaml"], r"config error: config file nope\.yaml not found"),
    ("train", ["--confg", "x.yaml"], r"usage error: unrecognized arguments: --confg"),
    ("eval", ["--config", "nope.yaml"], r"config error: config file nope\.yaml not found"),
    ("serve", [], r"usage error: the following arguments are required: --model-path"),
    ("convert", [], r"usage error: give a direction: dapo-megatron convert \{hf-to-megatron\|megatron-to-hf\}"),
    ("convert", ["hf-to-megatron", "--hf-dir", "/nonexistent/hf", "--save-dir", "SAVE"],
     r"(checkpoint|model|file) error: .*/nonexistent/hf"),
    ("convert", ["megatron-to-hf", "--load-dir", "x"], r"usage error: the following arguments are required: --save-dir"),
    ("plan", ["--config", "nope.yaml", "--nodes", "1", "--gpus-per-node", "1"],
     r"config error: config file nope\.yaml not found"),
    ("plan", ["--config", "examples/dapo_qwen2.5_7b/config.yaml", "--nodes", "1", "--gpus-per-node", "8",
              "parallel.tensor_model_parallel_size=3"], r"placement error: parallel\.tensor_model_parallel_size=3"),
    ("plan", ["--config", "examples/dapo_qwen2.5_7b/config.yaml", "--gpus-per-node", "8"],
     r"usage error: the following arguments are required: --nodes"),
    ("engines", ["--config", "nope.yaml", "--nodes", "2", "--gpus-per-node", "8", "--node-rank", "1"],
     r"config error: config file nope\.yaml not found"),
    ("report", [], r"usage error: the following arguments are required: run_dir"),
    ("report", ["/nonexistent/run", "--steps", "x"], r"usage error: --steps 'x': give step numbers"),
]


@pytest.mark.parametrize("command, args, pattern", STYLE_CASES, ids=lambda x: x if isinstance(x, str) else None)
def test_every_command_says_user_errors_in_one_style(command, args, pattern, capsys, tmp_path, monkeypatch):
    import re

    from dapo_megatron.cli import run_command

    monkeypatch.chdir(REPO)
    rc = run_command(command, [a.replace("SAVE", str(tmp_path / "out")) for a in args])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (rc, out, err)
    assert re.match(rf"dapo-megatron {command}: [a-z ]+ error: ", lines[0]), lines[0]
    assert re.search(pattern, lines[0]), lines[0]


def test_style_cases_cover_every_command():
    from dapo_megatron.cli import COMMANDS

    assert {c for c, _, _ in STYLE_CASES} == set(COMMANDS)


def test_plan_and_unknown_command_as_processes():
    # the example: `plan --config nope.yaml` printed `placement error: ...` and exited 1
    rc, out, err = cli("plan", "--config", "nope.yaml", "--nodes", "1", "--gpus-per-node", "1")
    assert_one_line(rc, out, err, r"^dapo-megatron plan: config error: config file nope\.yaml not found")
    rc, out, err = cli("trian")
    assert rc == 2 and err.startswith("dapo-megatron: usage error: unknown command 'trian'")
