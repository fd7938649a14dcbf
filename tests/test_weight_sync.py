"""Weight sync: after a sync the engine's log-probs equal the new weights' forward (fp32, < 1e-4), with a version."""
import asyncio
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from dapo_megatron.models.tiny import make_tiny_hf_model
from dapo_megatron.rollout.client import RolloutClient, RolloutServerError
from dapo_megatron.rollout.engine import Engine
from dapo_megatron.rollout.sample import Sample
from dapo_megatron.rollout.server import free_port, launch_embedded_server, wait_for_health
from dapo_megatron.rollout.weight_sync import (DistributedWeightSync, TensorWeightSync,
                                               iter_buckets, make_weight_sync, write_hf_checkpoint)
from waiting import held, result, wait_until

PROMPT = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sync_models")
    return {name: make_tiny_hf_model(root / name, family="qwen2.5", seed=seed) for name, seed in (("A", 0), ("B", 1))}


def hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_tensors(path) -> list:
    """What the trainer hands over: full HF-named tensors."""
    return [(n, p.detach().clone()) for n, p in hf(path).named_parameters()]


def max_logprob_diff(model, sample: Sample) -> float:
    ids = torch.tensor([sample.prompt_ids + sample.response_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(sample.prompt_ids) - 1:-1]
    ref = torch.log_softmax(logits, -1).gather(1, torch.tensor(sample.response_ids)[:, None])[:, 0]
    return (torch.tensor(sample.rollout_logprobs) - ref).abs().max().item()


def rollout(client, g=2) -> list:
    samples = [Sample(prompt_ids=list(PROMPT), index=i) for i in range(g)]
    return asyncio.run(client.generate_group(samples, {"max_new_tokens": 10, "temperature": 1.0,
                                                       "ignore_eos": True}))


def assert_serves(client, models, name, version):
    model, other = hf(models[name]), hf(models["B" if name == "A" else "A"])
    for s in rollout(client):
        assert s.weight_version == version
        assert max_logprob_diff(model, s) < 1e-4
        assert max_logprob_diff(other, s) > 1e-3  # the check can tell the two models apart


def test_write_hf_checkpoint_shards_index_and_loads_in_transformers(models, tmp_path):
    named = hf_tensors(models["B"])
    embed = dict(named)["model.embed_tokens.weight"]
    out = write_hf_checkpoint(named + [("lm_head.weight", embed)], tmp_path / "ckpt", hf_config_dir=models["A"],
                              max_shard_bytes=40_000)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {n for n, _ in named} | {"lm_head.weight"}
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp folder left behind
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        assert torch.equal(hf(out)(ids).logits, hf(models["B"])(ids).logits)


def test_disk_sync_over_http_changes_the_served_weights(models, tmp_path):
    with launch_embedded_server(models["A"], 0) as server:
        client = RolloutClient([server.url])
        assert_serves(client, models, "A", 0)
        sync = make_weight_sync("disk", client, models["A"], tmp_path / "sync", max_shard_size_mb=0.05)
        assert sync.sync(hf_tensors(models["B"])) == 1
        assert_serves(client, models, "B", 1)
        assert sync.sync(iter(hf_tensors(models["A"]))) == 2  # a generator works too (shards written as they fill)
        assert_serves(client, models, "A", 2)
        assert [p.name for p in (tmp_path / "sync").iterdir()] == ["weights_v000002"]  # keep_last=1
        assert sync.last_sync["bytes"] == sum(t.numel() * 4 for _, t in hf_tensors(models["A"]))


def test_tensor_sync_in_process(models):
    engine = Engine(models["A"])
    try:
        client = RolloutClient(engine=engine)
        sync = make_weight_sync("tensor", client)  # an Engine or a client built with engine= both work
        assert sync.sync(hf_tensors(models["B"])) == 1 and engine.weight_version == 1
        assert_serves(client, models, "B", 1)
    finally:
        engine.shutdown()


def test_bad_updates_change_nothing(models, tmp_path):
    engine = Engine(models["A"])
    try:
        client = RolloutClient(engine=engine)
        good = hf_tensors(models["B"])
        bad_shape = good[:3] + [(good[3][0], torch.zeros(3, 3))]
        with pytest.raises(ValueError, match=f"{good[3][0]}.*shape"):
            engine.update_weights_from_tensor(bad_shape)
        with pytest.raises(ValueError, match="unknown parameter 'model.nope'"):
            engine.update_weights_from_tensor(good[:2] + [("model.nope", torch.zeros(1))])
        partial = write_hf_checkpoint(good[:-1], tmp_path / "partial", hf_config_dir=models["A"])
        with pytest.raises(RolloutServerError, match="lacks 1 parameters"):
            asyncio.run(client.update_weights_from_disk(str(partial)))
        wider = make_tiny_hf_model(tmp_path / "wider", family="qwen2.5", hidden_size=128)
        with pytest.raises(RolloutServerError, match="hidden_size=128"):
            asyncio.run(client.update_weights_from_disk(str(wider)))
        assert engine.weight_version == 0
        assert_serves(client, models, "A", 0)
    finally:
        engine.shutdown()


def test_update_waits_for_running_requests(models):
    engine = Engine(models["A"])
    try:
        named, order = hf_tensors(models["B"]), []
        engine.hold(steps=1)  # admitted and generating (a waiting request would get the new weights), then held
        running = engine.submit(PROMPT, {"max_new_tokens": 300, "ignore_eos": True})
        running.add_done_callback(lambda _: order.append("request done"))
        held(engine)

        def update():
            order.append("update called" if not running.done() else "request already done")
            engine.update_weights_from_tensor(named)
            order.append("update applied")

        updater = threading.Thread(target=update)
        updater.start()
        wait_until(lambda: engine._updates_pending, "the weight update to start waiting for the running request")
        engine.release()
        out = result(running, "the running request")[0]
        updater.join(timeout=60)
        assert not updater.is_alive(), "the weight update did not return within 60 s of the request finishing"
        assert order == ["update called", "request done", "update applied"] and engine.weight_version == 1
        # the whole response came from the old weights, and says so
        sample = Sample(prompt_ids=list(PROMPT), response_ids=out["output_ids"],
                        rollout_logprobs=[lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]])
        assert out["meta_info"]["weight_version"] == 0 and max_logprob_diff(hf(models["A"]), sample) < 1e-4
    finally:
        engine.shutdown()


def test_mode_errors(models):
    with pytest.raises(ValueError, match="unknown weight sync mode 'nccl'"):
        make_weight_sync("nccl")
    with pytest.raises(ValueError, match="in-process Engine"):
        TensorWeightSync(RolloutClient(["http://127.0.0.1:1"]))
    assert [len(b) for b in iter_buckets([(str(i), torch.zeros(10)) for i in range(5)], 80)] == [2, 2, 1]


# --------------------------------------------------------------------------- distributed (gloo stand-in for NCCL)
RECEIVER = r'''
import asyncio, sys, torch
from aiohttp import web
from dapo_megatron.rollout.weight_sync import init_weight_update_group

port, out_path = int(sys.argv[1]), sys.argv[2]
state = {"calls": [], "received": {}, "versions": []}

def receive(body):
    for name, dtype, shape in zip(body["names"], body["dtypes"], body["shapes"]):
        t = torch.empty(shape, dtype=getattr(torch, dtype))
        torch.distributed.broadcast(t, src=0, group=state["group"])
        state["received"][name] = t

async def handle(request):
    body = await request.json() if request.can_read_body else {}
    state["calls"].append(request.path)
    if request.path == "/init_weights_update_group":
        state["init"] = body
        state["group"] = await asyncio.to_thread(init_weight_update_group, body["master_address"],
            body["master_port"], body["rank_offset"], body["world_size"], body["group_name"], body["backend"])
    elif request.path == "/update_weights_from_distributed":
        await asyncio.to_thread(receive, body)
        state["versions"].append(body["weight_version"])
    elif request.path == "/destroy_weights_update_group":
        torch.save({k: v for k, v in state.items() if k != "group"}, out_path)
    return web.json_response({"success": True, "message": "ok"})

app = web.Application()
app.router.add_route("*", "/{tail:.*}", handle)
web.run_app(app, host="127.0.0.1", port=port, print=None)
'''


@pytest.mark.dist
def test_distributed_sync_protocol_with_a_fake_sglang_worker(models, tmp_path):
    """The sender side of /init_weights_update_group + bucketed /update_weights_from_distributed, over gloo."""
    script, out_path, port = tmp_path / "receiver.py", tmp_path / "received.pt", free_port()
    script.write_text(RECEIVER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, str(script), str(port), str(out_path)], env=env)
    try:
        wait_for_health(f"http://127.0.0.1:{port}", 300, process=proc)  # a bound, not a race: slow on a busy machine
        named = hf_tensors(models["B"]) + [("extra.bf16", torch.randn(4, 4).bfloat16())]
        sync = DistributedWeightSync(RolloutClient([f"http://127.0.0.1:{port}"]), master_address="127.0.0.1",
                                     master_port=free_port(), backend="gloo", device="cpu", bucket_size_mb=0.05)
        assert sync.sync(named) == 1
        sync.close()
        wait_until(out_path.exists, f"the fake worker to write {out_path.name} on /destroy_weights_update_group",
                   timeout_s=20, interval_s=0.1)
        got = torch.load(out_path)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert got["init"]["rank_offset"] == 1 and got["init"]["world_size"] == 2
    assert got["init"]["group_name"] == "dapo_weight_sync" and got["init"]["backend"] == "gloo"
    buckets = got["calls"].count("/update_weights_from_distributed")
    assert buckets > 2 and got["versions"] == ["1"] * buckets
    assert [c for c in got["calls"] if c != "/health"] == (["/init_weights_update_group", "/pause_generation",
                                                            "/begin_weight_update"]
                            + ["/update_weights_from_distributed"] * buckets
                            + ["/end_weight_update", "/flush_cache", "/continue_generation",
                               "/destroy_weights_update_group"])
    assert set(got["received"]) == {n for n, _ in named}
    for name, tensor in named:
        assert got["received"][name].dtype == tensor.dtype and torch.equal(got["received"][name], tensor)
