"""Checkpoint conversion: HF -> Megatron -> (load + re-save at TP=2 PP=2) -> HF is bit-identical, the Megatron
model's logits equal the HF model's, and every refused input gives one clear error and leaves nothing behind.

Process launches are shared by all tests (module fixture): one process for every HF->Megatron conversion and the
Megatron-side refusals, one 4-process torchrun for TP=2 PP=2, one process for the exports.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dapo_megatron.models.convert import parse_size, resolve_checkpoint
from dapo_megatron.models.hf_io import (
    CheckpointError,
    HFCheckpointReader,
    staging_dir,
    write_hf_checkpoint,
)
from dapo_megatron.models.tiny import make_tiny_hf_model

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "tests" / "dist_scripts"
FAMILIES = ["qwen2.5", "qwen3", "llama"]
VOCAB = 101


def run_conversions(jobs: list[dict], tmp: Path) -> list[dict]:
    """Run conversion CLI jobs in one fresh process; return [{"rc", "err"}] per job."""
    jobs_file = tmp / f"jobs_{len(list(tmp.glob('jobs_*')))}.json"
    jobs_file.write_text(json.dumps(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(SCRIPTS / "convert_many.py"), str(jobs_file)], capture_output=True,
                          text=True, timeout=300, env=env, cwd=REPO)
    if proc.returncode != 0:
        pytest.fail(f"convert_many.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def h2m(hf, out, *extra):
    return {"cmd": "hf-to-megatron", "args": ["--hf-dir", str(hf), "--save-dir", str(out), *extra]}


def m2h(load, out, *extra):
    return {"cmd": "megatron-to-hf", "args": ["--load-dir", str(load), "--save-dir", str(out), *extra]}


def edited_copy(src: Path, dst: Path, config=None, tensors=None) -> Path:
    """Copy of an HF folder with config.json fields and/or the tensor dict changed."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        dst.joinpath(f.name).write_bytes(f.read_bytes())
    if config:
        cfg = json.loads((src / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**cfg, **config}))
    if tensors:
        save_file(tensors(load_file(src / "model.safetensors")), dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _bad_hf_inputs(t: Path, q25: Path) -> dict:
    """name -> (HF folder, expected error pattern) for the HF-side refusals."""
    truncated = edited_copy(q25, t / "bad_truncated")
    st = truncated / "model.safetensors"
    os.truncate(st, st.stat().st_size - 100)
    return {
        "unknown_arch": (edited_copy(q25, t / "bad_arch", config={"architectures": ["MistralForCausalLM"]}),
                         "architectures=\\['MistralForCausalLM'\\] is not supported"),
        "missing": (edited_copy(q25, t / "bad_missing", tensors=lambda d: {
            k: v for k, v in d.items() if k != "model.layers.2.mlp.up_proj.weight"}),
            "'model.layers.2.mlp.up_proj.weight' is missing"),
        "extra": (edited_copy(q25, t / "bad_extra", tensors=lambda d: {
            **d, "model.layers.4.mlp.up_proj.weight": d["model.layers.0.mlp.up_proj.weight"].clone()}),
            "unexpected tensor 'model.layers.4.mlp.up_proj.weight' in model.safetensors"),
        "shape": (edited_copy(q25, t / "bad_shape", tensors=lambda d: {
            **d, "model.layers.1.self_attn.k_proj.weight": torch.zeros(64, 64)}),
            r"shape mismatch for 'model.layers.1.self_attn.k_proj.weight' in model.safetensors: checkpoint "
            r"\(64, 64\) vs \(32, 64\)"),
        "truncated": (truncated, "model.safetensors is truncated"),
        "bad_tp": (q25, "tensor_model_parallel_size=4 must divide num_attention_heads"),
    }


@pytest.fixture(scope="module")
def conv(tmp_path_factory):
    t = tmp_path_factory.mktemp("convert")
    # odd vocabulary: padded to 256 rows at TP=2 (make_vocab_size_divisible_by=128), stripped on the way out
    hf = {f: make_tiny_hf_model(t / f"hf_{f}", f, seed=11, vocab_size=VOCAB) for f in FAMILIES}
    hf["bf16"] = make_tiny_hf_model(t / "hf_bf16", "qwen2.5", seed=12, dtype=torch.bfloat16)
    mg = {k: t / f"mg_{k}" for k in hf}
    bad_hf = _bad_hf_inputs(t, hf["qwen2.5"])
    occupied = t / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    bad_cfg = {  # Megatron-side refusals: the checkpoint and a config that disagrees with it
        "m_missing": (mg["qwen2.5"], edited_copy(hf["qwen2.5"], t / "cfg_untied", {"tie_word_embeddings": False}),
                      "'output_layer.weight' is missing"),
        "m_extra": (mg["llama"], edited_copy(hf["llama"], t / "cfg_tied", {"tie_word_embeddings": True}),
                    "unexpected tensor 'output_layer.weight'"),
        "m_shape": (mg["qwen3"], edited_copy(hf["qwen3"], t / "cfg_ffn", {"intermediate_size": 96}),
                    r"shape mismatch for 'decoder.layers.mlp.linear_fc1.weight'.*\(4, 320, 64\) vs \(4, 192, 64\)"),
    }
    jobs = [h2m(hf[k], mg[k], "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2")
            for k in hf]
    jobs += [h2m(d, t / f"out_{k}", *(["--tensor-model-parallel-size", "4"] if k == "bad_tp" else []))
             for k, (d, _) in bad_hf.items()]
    jobs += [h2m(hf["qwen2.5"], occupied)]
    jobs += [m2h(root, t / f"out_{k}", "--hf-config", str(cfg)) for k, (root, cfg, _) in bad_cfg.items()]
    jobs += [m2h(mg["bf16"], t / "hf_bf16_back"), h2m(hf["llama"], t / "mg_llama_cast", "--dtype", "bf16"),
             m2h(t / "mg_llama_cast", t / "hf_llama_cast")]
    names = [*hf, *bad_hf, "occupied", *bad_cfg, "bf16_back", "cast", "cast_back"]
    results = dict(zip(names, run_conversions(jobs, t)))

    # The trainer's side: load each checkpoint at TP=2 PP=2, compute logits, re-save as iteration 5.
    tp_jobs = [{"hf_dir": str(hf[f]), "mg_root": str(mg[f]), "out_root": str(t / f"resaved_{f}"),
                "logits": str(t / f"logits_{f}.pt")} for f in FAMILIES]
    (t / "tp_jobs.json").write_text(json.dumps(tp_jobs))
    from conftest import run_torchrun

    run_torchrun(SCRIPTS / "convert_tp2pp2.py", 4, t / "tp_jobs.json", 2, 2)
    (t / "hf_back_llama").mkdir()
    (t / "hf_back_llama" / "stale.txt").write_text("replaced by --overwrite")
    back_jobs = [m2h(t / "resaved_qwen2.5", t / "hf_back_qwen2.5"),
                 m2h(t / "resaved_qwen3", t / "hf_back_qwen3", "--iteration", "5", "--max-shard-size", "200KB"),
                 m2h(t / "resaved_llama", t / "hf_back_llama", "--overwrite")]
    results.update(zip([f"back_{f}" for f in FAMILIES], run_conversions(back_jobs, t)))
    return {"t": t, "hf": hf, "mg": mg, "results": results, "bad_hf": bad_hf, "bad_cfg": bad_cfg,
            "occupied": occupied}


def assert_same_tensors(a_dir, b_dir):
    with HFCheckpointReader(a_dir) as a, HFCheckpointReader(b_dir) as b:
        assert sorted(a.names) == sorted(b.names)
        for n in a.names:
            x, y = a.get(n), b.get(n)
            assert x.dtype == y.dtype and torch.equal(x, y), f"{n} differs"


def assert_nothing_left(parent: Path, name: str):
    assert not (parent / name).exists()
    assert not [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


@pytest.mark.dist
@pytest.mark.parametrize("family", FAMILIES)
def test_roundtrip_through_tp2_pp2_is_bit_identical(conv, family):
    res = conv["results"]
    assert res[family]["rc"] == 0 and res[f"back_{family}"]["rc"] == 0, res
    out = conv["t"] / f"hf_back_{family}"
    assert_same_tensors(conv["hf"][family], out)
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "model.safetensors.index.json"):
        assert (out / f).is_file(), f
    assert not (out / "stale.txt").exists()  # --overwrite replaced the folder
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    if family == "qwen3":  # exported with --max-shard-size 200KB: ~1 MB of weights in 200 KB shards
        assert len(shards) >= 5
        assert all((out / s).stat().st_size <= 200_000 + 8 + 64 * 1024 for s in shards)
    else:
        assert shards == ["model-00001-of-00001.safetensors"]
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in load_file(conv["hf"][family] /
                                                                                   "model.safetensors").values())


@pytest.mark.dist
@pytest.mark.parametrize("family", FAMILIES)
def test_megatron_logits_at_tp2_pp2_equal_hf(conv, family):
    from transformers import AutoModelForCausalLM

    got = torch.load(conv["t"] / f"logits_{family}.pt")
    model = AutoModelForCausalLM.from_pretrained(conv["t"] / f"hf_back_{family}", dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(got["ids"]).logits
    assert got["logits"].shape == ref.shape == (2, 24, VOCAB)
    assert (got["logits"] - ref).abs().max().item() < 1e-4


@pytest.mark.dist
def test_checkpoint_layout_and_bf16(conv):
    root = conv["mg"]["qwen2.5"]
    assert (root / "latest").read_text().strip() == "iter_0000000"
    assert resolve_checkpoint(root) == root / "iter_0000000" / "model"
    assert (root / "iter_0000000" / "model" / "metadata.json").is_file()
    from megatron.core import dist_checkpointing

    stored = dist_checkpointing.load_tensors_metadata(str(root / "iter_0000000" / "model"))
    assert tuple(stored["embedding.word_embeddings.weight"].global_shape) == (256, 64)  # 101 padded for TP=2
    copied = {p.name for p in (root / "hf_config").iterdir()}
    assert {"config.json", "tokenizer.json", "generation_config.json"} <= copied and "model.safetensors" not in copied
    assert conv["results"]["bf16_back"]["rc"] == 0
    back = conv["t"] / "hf_bf16_back"
    assert_same_tensors(conv["hf"]["bf16"], back)
    assert json.loads((back / "config.json").read_text())["dtype"] == "bfloat16"
    # fp32 llama converted with --dtype bf16: the export holds exactly the bf16-rounded weights.
    assert conv["results"]["cast"]["rc"] == 0 and conv["results"]["cast_back"]["rc"] == 0
    with HFCheckpointReader(conv["hf"]["llama"]) as a, HFCheckpointReader(conv["t"] / "hf_llama_cast") as b:
        assert sorted(a.names) == sorted(b.names)
        for n in a.names:
            assert b.dtype(n) == torch.bfloat16 and torch.equal(a.get(n).to(torch.bfloat16), b.get(n)), n
    # The trainer's entries beside the model (optim/, trainer_state.json) were ignored by the export.
    assert (conv["t"] / "resaved_qwen3" / "iter_0000005" / "optim").is_dir()


@pytest.mark.dist
@pytest.mark.parametrize("case", ["unknown_arch", "missing", "extra", "shape", "truncated", "bad_tp", "m_missing",
                                  "m_extra", "m_shape"])
def test_refused_inputs_name_the_culprit_and_leave_nothing(conv, case):
    import re

    res = conv["results"][case]
    pattern = conv["bad_hf"][case][1] if case in conv["bad_hf"] else conv["bad_cfg"][case][2]
    assert res["rc"] == 2, res
    assert res["err"].startswith("dapo-megatron convert: ") and res["err"].count("\n") == 1, res["err"]
    assert re.search(pattern, res["err"]), res["err"]
    assert_nothing_left(conv["t"], f"out_{case}")


@pytest.mark.dist
def test_occupied_target_is_refused_untouched(conv):
    res = conv["results"]["occupied"]
    assert res["rc"] == 2 and "is not empty; pass --overwrite" in res["err"]
    assert [p.name for p in conv["occupied"].iterdir()] == ["keep.txt"]
    assert not [p.name for p in conv["t"].iterdir() if p.name.startswith(".occupied.")]


def test_hf_check_tolerates_spelled_out_tied_head_and_rope_buffers(tmp_path):
    from dapo_megatron.models.convert import check_hf_tensors, hf_to_megatron
    from dapo_megatron.models.hf_config import arch_from_hf, load_hf_config

    src = make_tiny_hf_model(tmp_path / "src", "qwen2.5", seed=1)
    arch = arch_from_hf(load_hf_config(src))
    same = edited_copy(src, tmp_path / "same", tensors=lambda d: {
        **d, "lm_head.weight": d["model.embed_tokens.weight"].clone(),
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)})
    with HFCheckpointReader(same) as r:
        check_hf_tensors(r, arch)
    differs = edited_copy(src, tmp_path / "differs", tensors=lambda d: {
        **d, "lm_head.weight": d["model.embed_tokens.weight"] + 1})
    with HFCheckpointReader(differs) as r, pytest.raises(CheckpointError, match="unexpected tensor 'lm_head.weight'"):
        check_hf_tensors(r, arch)
    with pytest.raises(CheckpointError, match="would replace the input"):
        hf_to_megatron(src, src, overwrite=True)
    with pytest.raises(CheckpointError, match="would replace the input"):
        hf_to_megatron(src, tmp_path, overwrite=True)


def test_resolve_checkpoint_refusals(tmp_path):
    with pytest.raises(CheckpointError, match="has no `latest` file"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "latest").write_text("iter_0000003\n")
    (tmp_path / "iter_0000003" / "model").mkdir(parents=True)  # a save that died before metadata.json
    with pytest.raises(CheckpointError, match="iter_0000003/model is not a complete dist checkpoint"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="iter_0000007/model is not a complete"):
        resolve_checkpoint(tmp_path, iteration=7)
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")


# ---------------------------------------------------------------- hf_io units (no megatron)


def test_writer_shards_by_size_and_safetensors_reads_them(tmp_path):
    from safetensors import safe_open

    tensors = {f"t{i}": torch.arange(i * 100, i * 100 + 250, dtype=torch.float32).reshape(25, 10) for i in range(5)}
    tensors["b"] = torch.tensor([1.5, -2.0], dtype=torch.bfloat16)
    out = write_hf_checkpoint(tensors.items(), tmp_path / "hf", max_shard_bytes=2000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    # 1000-byte tensors, 2000-byte shards: t0+t1, t2+t3, t4+b
    assert index["weight_map"] == {"t0": "model-00001-of-00003.safetensors", "t1": "model-00001-of-00003.safetensors",
                                   "t2": "model-00002-of-00003.safetensors", "t3": "model-00002-of-00003.safetensors",
                                   "t4": "model-00003-of-00003.safetensors", "b": "model-00003-of-00003.safetensors"}
    assert index["metadata"]["total_size"] == 5 * 1000 + 4
    for name, file in index["weight_map"].items():
        with safe_open(out / file, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert torch.equal(f.get_tensor(name), tensors[name])
    with HFCheckpointReader(out) as r:
        assert r.dtype("b") == torch.bfloat16 and torch.equal(r.get("t3"), tensors["t3"])
        r.get("t2").untyped_storage().resize_(0)  # read buffers stay freeable
    tensors["t0"].untyped_storage().resize_(0)  # the writer did not pin the caller's storage (offload frees it)


def test_writer_dtype_cast_config_and_header_overflow(tmp_path, monkeypatch):
    import dapo_megatron.models.hf_io as hf_io

    src = tmp_path / "cfg"
    src.mkdir()
    (src / "config.json").write_text('{"torch_dtype": "float32"}')
    (src / "tokenizer.json").write_text("{}")
    (src / "model.safetensors").write_text("weights are not copied")
    # Each header entry is ~95 bytes, so 2 fit in 256: shards close early instead of overflowing the header.
    monkeypatch.setattr(hf_io, "HEADER_RESERVE", 256)
    named = [(f"layer.{i}.a_rather_long_tensor_name.weight", torch.full((2,), float(i))) for i in range(7)]
    out = write_hf_checkpoint(named, tmp_path / "hf", hf_config_dir=src, dtype=torch.bfloat16)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["config.json", *[f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)],
                     "model.safetensors.index.json", "tokenizer.json"]
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with HFCheckpointReader(out) as r:
        assert [r.get(n).tolist() for n, _ in named] == [[float(i)] * 2 for i in range(7)]
        assert r.dtype(named[0][0]) == torch.bfloat16


def test_failed_write_leaves_nothing_and_keeps_old_output(tmp_path):
    def broken():
        yield "a", torch.ones(3)
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError, match="source died"):
        write_hf_checkpoint(broken(), tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "old.txt").write_text("previous export")
    with pytest.raises(RuntimeError, match="source died"):
        write_hf_checkpoint(broken(), tmp_path / "hf", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]
    assert (tmp_path / "hf" / "old.txt").read_text() == "previous export"
    with pytest.raises(CheckpointError, match="written twice"):
        write_hf_checkpoint([("a", torch.ones(1)), ("a", torch.ones(1))], tmp_path / "dup")
    assert_nothing_left(tmp_path, "dup")


def test_staging_dir_replaces_only_on_success(tmp_path):
    out = tmp_path / "out"
    with staging_dir(out) as tmp:
        (tmp / "x").write_text("1")
    assert (out / "x").read_text() == "1" and oct(out.stat().st_mode & 0o777) != oct(0o700)
    with pytest.raises(CheckpointError, match="is not empty; pass --overwrite"):
        with staging_dir(out):
            pass
    with staging_dir(out, overwrite=True) as tmp:
        (tmp / "y").write_text("2")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["y"]


def test_reader_refuses_broken_folders(tmp_path):
    save_file({"w": torch.ones(4)}, tmp_path / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"w": "model-00001-of-00002.safetensors",
                                            "v": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="lists shard model-00002-of-00002.safetensors, which is missing"):
        HFCheckpointReader(tmp_path)
    index["weight_map"] = {"w": "model-00001-of-00002.safetensors", "v": "model-00001-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="lists 'v' in model-00001-of-00002.safetensors, which does not"):
        HFCheckpointReader(tmp_path)
    (tmp_path / "junk").mkdir()
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        HFCheckpointReader(tmp_path / "junk")
    (tmp_path / "junk" / "model.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(CheckpointError, match="junk/model.safetensors is truncated or not a safetensors file"):
        HFCheckpointReader(tmp_path / "junk")


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 1024**3
    assert parse_size("200kb") == 200_000
    assert parse_size("1234") == 1234


def test_raw_tensor_span_reads_only_plain_contiguous_tensors(tmp_path):
    """The Megatron->HF fast path: a torch.save'd plain tensor (CRC32 on or off) is found in place in a file;
    a transposed one, a view of a larger storage, or a non-tensor are left to torch.load (None)."""
    import io

    from dapo_megatron.models.dist_reader import raw_tensor_span

    t = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)
    blobs = []
    for obj, crc in [(t, True), (t, False), (t.t(), True), (t[1:], True), ({"a": 1}, True)]:
        b = io.BytesIO()
        torch.serialization.set_crc32_options(crc)
        try:
            torch.save(obj, b)
        finally:
            torch.serialization.set_crc32_options(True)
        blobs.append(b.getvalue())
    path, at, spans = tmp_path / "chunks.distcp", 100, []
    with open(path, "wb") as f:
        f.write(b"x" * at)
        for blob in blobs:
            spans.append((at, len(blob)))
            f.write(blob)
            at += len(blob)
    with open(path, "rb") as f:
        found = [raw_tensor_span(f, off, n) for off, n in spans]
        for span in found[:2]:
            start, dtype, shape = span
            assert dtype == torch.bfloat16 and shape == (3, 4)
            f.seek(start)
            assert torch.equal(torch.frombuffer(bytearray(f.read(24)), dtype=torch.bfloat16).reshape(3, 4), t)
    assert found[2:] == [None, None, None]
