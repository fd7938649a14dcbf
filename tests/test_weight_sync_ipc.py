"""Tensor-mode weight sync with real SGLang (CUDA IPC to /update_weights_from_tensor): what runs on CPU, checked on CPU.

- the buckets, in order, inside SGLang's weight-update session (a fake client records every call);
- the request body against the pinned sglang's UpdateWeightsFromTensorReqInput fields, its HTTP routes and the
  globals its SafeUnpickler allows (read from the installed source: io_struct does not import on CPU), and one
  round trip through sglang's own MultiprocessingSerializer (tools venv; marked sglang_cpu);
- the one-line refusals (config, placement, no CUDA, another GPU) and the registry that picks the class;
- on a GPU (`gpu`): a real server's weights switch from model A to model B.
"""
import ast
import base64
import io
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dapo_megatron.config import ConfigError, RolloutConfig
from dapo_megatron.rollout.backends import BACKENDS
from dapo_megatron.rollout.weight_sync import (CudaIpcWeightSync, DiskWeightSync, TensorWeightSync, WeightSyncRefused,
                                               check_ipc_sender, pack_bucket, tensor_update_request)

REPO = Path(__file__).resolve().parents[1]
TOOLS_PY = REPO / "tools" / ".venv-sglang" / "bin" / "python"
READY = any((REPO / "tools" / ".venv-sglang").glob(".ready-sglang-*"))


class FakeClient:
    """Records control calls; `fail_on` makes the n-th update_weights_from_tensor answer like a 400."""

    def __init__(self, fail_on=None):
        self.worker_urls, self.calls, self.bodies, self.fail_on = ["http://127.0.0.1:1"], [], [], fail_on

    def __getattr__(self, name):
        async def call(payload=None, timeout_s=None):
            self.calls.append(name)
            if name == "update_weights_from_tensor":
                self.bodies.append(payload)
                if len(self.bodies) == self.fail_on:
                    raise RuntimeError("/update_weights_from_tensor failed on 1 of 1 servers: HTTP 400")
            return [{"success": True}]
        return call


def decode(body) -> list:
    """In-process: CPU tensors shared by ForkingPickler come back through this process's own fd sharer."""
    return pickle.loads(base64.b64decode(body["serialized_named_tensors"][0]))


def named_tensors():
    g = torch.Generator().manual_seed(0)
    return [("model.embed_tokens.weight", torch.randn(64, 16, generator=g).bfloat16()),
            ("model.layers.0.self_attn.q_proj.weight", torch.randn(16, 16, generator=g)),
            ("model.layers.0.self_attn.q_proj.bias", torch.randn(16, generator=g)),
            ("model.layers.0.mlp.up_proj.weight", torch.randn(32, 16, generator=g).bfloat16()),
            ("model.norm.weight", torch.randn(16, generator=g)),
            ("lm_head.weight", torch.randn(64, 16, generator=g).bfloat16())]


def test_buckets_go_in_order_inside_one_weight_update_session():
    named = named_tensors()
    client = FakeClient()
    sync = CudaIpcWeightSync(client, device="cpu", bucket_size_mb=2100 / 2 ** 20)  # 2100 bytes per bucket
    assert sync.sync(named) == 1 and sync.weight_version == 1
    n = len(client.bodies)
    assert client.calls == ["pause_generation", "begin_weight_update", *["update_weights_from_tensor"] * n,
                            "end_weight_update", "flush_cache", "continue_generation"]
    got = [decode(b) for b in client.bodies]
    # embed 2048 B alone; q_proj 1024 + bias 64, + up_proj 1024 = 2112 > 2100 opens the third; lm_head 2048 alone
    assert [[name for name, _ in b] for b in got] == [[named[0][0]], [named[1][0], named[2][0]],
                                                      [named[3][0], named[4][0]], [named[5][0]]]
    flat = [t for b in got for t in b]
    for (name, want), (got_name, t) in zip(named, flat):
        assert got_name == name and t.dtype == want.dtype and torch.equal(t, want)
    assert all(b["weight_version"] == "1" and b["flush_cache"] is False and b["load_format"] is None
               and len(b["serialized_named_tensors"]) == 1 for b in client.bodies)
    assert sync.last_sync["bytes"] == sum(t.numel() * t.element_size() for _, t in named) == 6272


def test_pack_bucket_makes_one_fresh_buffer_per_dtype():
    bucket = named_tensors()[:4]
    named, nbytes = pack_bucket(bucket, "cpu")
    storages = {t.untyped_storage().data_ptr() for _, t in named}
    assert len(storages) == 2 and nbytes == 2048 + 1024 + 64 + 1024  # bf16 buffer, fp32 buffer
    assert storages.isdisjoint(src.untyped_storage().data_ptr() for _, src in bucket)  # copies, not the sources
    assert all(torch.equal(t, src) and t.shape == src.shape for (_, t), (_, src) in zip(named, bucket))


def test_a_failed_bucket_closes_the_session_and_resumes_generation():
    client = FakeClient(fail_on=2)
    sync = CudaIpcWeightSync(client, device="cpu", bucket_size_mb=2100 / 2 ** 20)
    with pytest.raises(RuntimeError, match="HTTP 400"):
        sync.sync(named_tensors())
    assert client.calls == ["pause_generation", "begin_weight_update", "update_weights_from_tensor",
                            "update_weights_from_tensor", "end_weight_update", "continue_generation"]
    assert sync.weight_version == 0  # no flush, no new version: the next sync pushes everything again


def test_refusals_are_one_line_and_name_the_fix(monkeypatch):
    lines = []
    with pytest.raises(ConfigError) as e:
        RolloutConfig(backend="sglang", weight_sync="tensor", sglang_tp_size=2)
    assert "sglang_tp_size=1" in str(e.value) and "use disk or distributed" in str(e.value)
    lines.append(str(e.value))
    for bad in ({"sglang_num_servers": 2}, {"colocate": False}):
        with pytest.raises(ConfigError, match="one colocated SGLang server of TP 1"):
            RolloutConfig(backend="sglang", weight_sync="tensor", **bad)
    with pytest.raises(ConfigError, match="rollout.backend=http needs the engine"):
        RolloutConfig(backend="http", urls=["http://x:1"], weight_sync="tensor")
    RolloutConfig(backend="sglang", weight_sync="tensor")  # one colocated TP-1 server: accepted
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(WeightSyncRefused) as e:
        check_ipc_sender(engine_gpu=0)
    assert str(e.value) == ("rollout.weight_sync=tensor with rollout.backend=sglang sends CUDA IPC handles, but this "
                            "rank has no CUDA device; use rollout.weight_sync=disk")
    lines.append(str(e.value))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    with pytest.raises(WeightSyncRefused, match="global rank 0 is on GPU 1 and the engine on GPU 0; use ") as e:
        check_ipc_sender(engine_gpu=0)
    lines.append(str(e.value))
    check_ipc_sender(engine_gpu=1)
    with pytest.raises(WeightSyncRefused, match="sends to one colocated server; got 2") as e:
        CudaIpcWeightSync(SimpleNamespace(worker_urls=["a", "b"]))
    lines.append(str(e.value))
    assert all("\n" not in line for line in lines)


def test_sglang_backend_refuses_before_any_server_starts(tmp_path, monkeypatch):
    import dapo_megatron.rollout.sglang_launcher as launcher

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(launcher, "servers_for", lambda *a, **k: pytest.fail("a server was started"))
    from dapo_megatron.rollout.backends import make_backend

    with pytest.raises(WeightSyncRefused, match="no CUDA device"):
        make_backend(RolloutConfig(backend="sglang", weight_sync="tensor"), model_path=tmp_path, seed=0,
                     run_dir=tmp_path)


def test_the_backend_registry_picks_the_sync_class():
    def cls(backend, mode):
        b = object.__new__(BACKENDS[backend])
        b.cfg = RolloutConfig(backend=backend, weight_sync=mode, urls=["http://x:1"] if backend == "http" else [])
        return b.weight_sync_class()

    assert cls("sglang", "tensor") is CudaIpcWeightSync and cls("embedded", "tensor") is TensorWeightSync
    assert cls("sglang", "disk") is DiskWeightSync and cls("sglang", "auto") is DiskWeightSync
    assert cls("embedded", "auto") is TensorWeightSync
    from dapo_megatron.rollout.weight_sync import DistributedWeightSync

    assert cls("http", "distributed") is DistributedWeightSync and DistributedWeightSync.for_backend(None) is None


# --------------------------------------------------------------------------- against the pinned sglang's source
def _site() -> Path:
    found = sorted((REPO / "tools" / ".venv-sglang" / "lib").glob("python*/site-packages/sglang"))
    assert found, "sglang not found in the tools venv"
    return found[0]


def _struct_fields(source: Path, name: str) -> tuple[set, set]:
    """(all annotated fields, those without a default) of class `name` (sglang's msgspec request structs)."""
    cls = next(n for n in ast.walk(ast.parse(source.read_text())) if isinstance(n, ast.ClassDef) and n.name == name)
    fields = [n for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]
    return {f.target.id for f in fields}, {f.target.id for f in fields if f.value is None}


def _allowed_globals() -> set:
    tree = ast.parse((_site() / "srt/utils/common.py").read_text())
    cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "SafeUnpickler")
    assign = next(n for n in cls.body if isinstance(n, ast.Assign) and n.targets[0].id == "ALLOWED_GLOBALS")
    return {tuple(ast.literal_eval(e)) for e in assign.value.elts}


@pytest.mark.sglang_cpu
@pytest.mark.skipif(not READY, reason="needs the sglang tools venv: bash tools/setup_sglang_cpu.sh")
def test_request_body_routes_and_pickle_globals_match_the_pinned_sglang():
    named, _size = pack_bucket(named_tensors(), "cpu")
    body = tensor_update_request(named, version=3)
    fields, required = _struct_fields(_site() / "srt/managers/io_struct.py", "UpdateWeightsFromTensorReqInput")
    assert set(body) <= fields and required <= set(body), (sorted(body), sorted(fields), sorted(required))
    assert {"serialized_named_tensors", "load_format", "flush_cache", "weight_version"} == set(body)
    assert isinstance(body["serialized_named_tensors"][0], str) and isinstance(body["weight_version"], str)
    routes = set(re.findall(r'@app\.(?:post|api_route|get)\("(/\w+)"', (_site() / "srt/entrypoints/http_server.py")
                            .read_text()))
    client_paths = set(re.findall(r'_fan_out\("(/\w+)"', (REPO / "dapo_megatron/rollout/client.py").read_text()))
    assert {"/begin_weight_update", "/end_weight_update", "/update_weights_from_tensor"} <= client_paths
    assert client_paths <= routes, client_paths - routes
    seen = set()

    class Recording(pickle.Unpickler):
        def find_class(self, module, name):
            seen.add((module, name))
            return super().find_class(module, name)

    Recording(io.BytesIO(base64.b64decode(body["serialized_named_tensors"][0]))).load()
    allowed = _allowed_globals()
    assert seen and seen <= allowed, seen - allowed
    # on a GPU the storage comes back through rebuild_cuda_tensor instead of rebuild_storage_fd
    assert ("torch.multiprocessing.reductions", "rebuild_cuda_tensor") in allowed


@pytest.mark.sglang_cpu
@pytest.mark.skipif(not READY, reason="needs the sglang tools venv: bash tools/setup_sglang_cpu.sh")
def test_the_pinned_sglang_decodes_every_bucket_and_parses_stage3s_server(tmp_path):
    """sglang's own normalize + MultiprocessingSerializer (SafeUnpickler) read each bucket; ServerArgs accepts the
    gpu_check stage-3 server that puts the NCCL engine on GPU 1."""
    sys.path.insert(0, str(REPO / "tools"))
    import gpu_check_stages

    runs, _ = gpu_check_stages.stage3_runs(tmp_path, tmp_path / "m", tmp_path / "d.jsonl", 2, base_port=31000)
    from dapo_megatron.rollout.sglang_launcher import SGLangServers

    server = next(r for r in runs if r.server).server
    spec = {"tensors": [[n, str(t.dtype).replace("torch.", ""), list(t.shape)] for n, t in named_tensors()],
            "bucket_mb": 2100 / 2 ** 20,
            "server_commands": [SGLangServers(**server, log_dir=tmp_path, python="python").server_command(0)]}
    proc = subprocess.run([str(TOOLS_PY), str(REPO / "tools" / "sglang_tensor_check.py")], input=json.dumps(spec),
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    got = [t for b in out["buckets"] for t in b["tensors"]]
    assert [len(b["tensors"]) for b in out["buckets"]] == [1, 2, 2, 1]
    assert all(b["tp_entries"] == 1 and b["weight_version"] == "7" for b in out["buckets"])
    for i, ((name, dtype, shape), (got_name, got_dtype, got_shape, total)) in enumerate(zip(spec["tensors"], got)):
        numel = torch.Size(shape).numel()
        want = float((torch.arange(numel, dtype=torch.float64) * 0.5 + i).to(getattr(torch, dtype)).double().sum())
        assert (got_name, got_dtype, got_shape) == (name, dtype, shape) and total == pytest.approx(want, rel=1e-6)
    args = out["servers"][0]
    assert args["base_gpu_id"] == 1 and args["port"] == 31100 and args["api_key"] == "gpu-check"


# --------------------------------------------------------------------------- real SGLang on a GPU
@pytest.mark.gpu
def test_cuda_ipc_sync_switches_a_real_server_to_new_weights(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("sglang")
    from test_sglang_gpu import SHAPE, _hf_tensors, assert_from, free_port_block, rollout

    from dapo_megatron.models.tiny import make_tiny_hf_model
    from dapo_megatron.rollout.sglang_launcher import SGLangServers
    from dapo_megatron.rollout.weight_sync import make_weight_sync

    models = {name: make_tiny_hf_model(tmp_path / name, family="qwen2.5", seed=seed, init_std=0.1, **SHAPE)
              for name, seed in (("A", 0), ("B", 1))}
    torch.cuda.set_device(0)
    with SGLangServers(models["A"], mem_fraction_static=0.3, base_port=free_port_block(), log_dir=tmp_path / "logs",
                       dtype="bfloat16") as servers:
        client = servers.client()
        check_ipc_sender(engine_gpu=servers.base_gpu_id)
        sync = make_weight_sync("cuda_ipc", client, bucket_size_mb=1)
        named = [(n, t.cuda().bfloat16()) for n, t in _hf_tensors(models["B"])]
        assert sync.sync(named) == 1 and sync.last_sync["bytes"] == sum(t.numel() * 2 for _, t in named)
        for s in rollout(client):
            assert s.weight_version == 1
            assert_from(models, "B", s)
