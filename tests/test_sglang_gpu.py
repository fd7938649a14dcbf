"""Real SGLang servers on GPU: launch, generate through the client, weight sync (disk, NCCL), colocation, router.

Needs a CUDA GPU and `pip install sglang sglang-router` (the `gpu` extra); skipped otherwise. The model is a tiny
random qwen2.5 with head_dim 64 (a size every attention kernel supports) and init_std 0.1, so two seeds give clearly
different log-probs (mean |diff| ~4) while SGLang's bf16 differs from the fp32 HF forward by ~0.04: the checks use
0.15. The CPU tests hold the embedded engine to < 1e-4 in fp32.
"""
import asyncio

import pytest
import torch

from dapo_megatron.rollout.sglang_launcher import free_port_block

pytestmark = pytest.mark.gpu

SHAPE = {"hidden_size": 256, "intermediate_size": 704, "num_attention_heads": 4, "num_key_value_heads": 2,
         "vocab_size": 1024}
PROMPT = [5, 6, 7, 8, 9]
TOL = 0.15  # mean |engine log-prob - HF fp32 log-prob| for bf16 serving


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    pytest.importorskip("sglang")
    from dapo_megatron.models.tiny import make_tiny_hf_model

    root = tmp_path_factory.mktemp("sglang_models")
    return {name: make_tiny_hf_model(root / name, family="qwen2.5", seed=seed, init_std=0.1, **SHAPE)
            for name, seed in (("A", 0), ("B", 1))}


def assert_from(models, name, sample):
    other = "B" if name == "A" else "A"
    assert hf_logprob_diff(models[name], sample) < TOL < 1.0 < hf_logprob_diff(models[other], sample)


def hf_logprob_diff(path, sample) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    ids = torch.tensor([sample.prompt_ids + sample.response_ids], device="cuda")
    with torch.no_grad():
        logits = model(ids).logits[0, len(sample.prompt_ids) - 1:-1].float()
    ref = torch.log_softmax(logits, -1).gather(1, torch.tensor(sample.response_ids, device="cuda")[:, None])[:, 0]
    return (torch.tensor(sample.rollout_logprobs, device="cuda") - ref).abs().mean().item()


def rollout(client, g=4):
    from dapo_megatron.rollout.sample import Sample

    samples = [Sample(prompt_ids=list(PROMPT), index=i) for i in range(g)]
    return asyncio.run(client.generate_group(samples, {"max_new_tokens": 16, "temperature": 1.0,
                                                       "ignore_eos": True}))


def test_launch_generate_disk_sync_and_shutdown(models, tmp_path):
    from dapo_megatron.rollout.sglang_launcher import SGLangServers
    from dapo_megatron.rollout.weight_sync import make_weight_sync

    with SGLangServers(models["A"], num_servers=1, tp_size=1, mem_fraction_static=0.3,
                       base_port=free_port_block(), log_dir=tmp_path / "logs", dtype="bfloat16") as servers:
        client = servers.client(max_concurrency=8, request_timeout_s=120)
        infos = asyncio.run(client.wait_healthy(timeout_s=60))
        assert infos[0]["is_generation"]
        for s in rollout(client):
            assert len(s.response_ids) == 16 == len(s.rollout_logprobs) and s.finish_reason == "length"
            assert_from(models, "A", s)
        sync = make_weight_sync("disk", client, models["A"], tmp_path / "sync")
        assert sync.sync(_hf_tensors(models["B"])) == 1
        for s in rollout(client):
            assert s.weight_version == 1
            assert_from(models, "B", s)
        procs = [p for p, _ in servers.processes.values()]
    assert all(p.poll() is not None for p in procs)


def test_colocated_release_and_resume_memory(models, tmp_path):
    pytest.importorskip("torch_memory_saver")
    from dapo_megatron.rollout.sglang_launcher import SGLangServers

    with SGLangServers(models["A"], mem_fraction_static=0.3, base_port=free_port_block(), enable_memory_saver=True,
                       log_dir=tmp_path / "logs", dtype="bfloat16") as servers:
        client = servers.client()
        before = torch.cuda.mem_get_info()[0]
        with servers.memory_released():
            assert torch.cuda.mem_get_info()[0] > before  # the engine gave memory back
        assert len(rollout(client, g=2)) == 2  # and serves again after resuming


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL sync needs the trainer and the engine on two GPUs")
def test_distributed_weight_sync_over_nccl(models, tmp_path):
    from dapo_megatron.rollout.sglang_launcher import SGLangServers
    from dapo_megatron.rollout.weight_sync import make_weight_sync

    torch.cuda.set_device(0)
    with SGLangServers(models["A"], mem_fraction_static=0.3, base_port=free_port_block(), base_gpu_id=1,
                       log_dir=tmp_path / "logs", dtype="bfloat16") as servers:
        client = servers.client()
        sync = make_weight_sync("distributed", client, master_address="127.0.0.1",
                                master_port=free_port_block(), engine_ranks=1, bucket_size_mb=1)
        try:
            assert sync.sync(_hf_tensors(models["B"])) == 1
            for s in rollout(client):
                assert s.weight_version == 1
                assert_from(models, "B", s)
        finally:
            sync.close()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="two servers behind a router need two GPUs")
def test_router_in_front_of_two_servers(models, tmp_path):
    pytest.importorskip("sglang_router")
    from dapo_megatron.rollout.sglang_launcher import SGLangServers

    with SGLangServers(models["A"], num_servers=2, mem_fraction_static=0.3, base_port=free_port_block(),
                       router=True, log_dir=tmp_path / "logs", dtype="bfloat16") as servers:
        client = servers.client()
        assert client.urls == [servers.router_url]
        assert len(asyncio.run(client.wait_healthy(timeout_s=60))) == 2
        assert all(len(s.response_ids) == 16 for s in rollout(client, g=8))
        asyncio.run(client.flush_cache())  # control calls reach both workers


def _hf_tensors(path):
    from transformers import AutoModelForCausalLM

    return [(n, p.detach().clone()) for n, p in AutoModelForCausalLM.from_pretrained(path).named_parameters()]
