"""MoE policies (Qwen3-MoE, Qwen2-MoE): HF config mapping, refusals, and EP / TP x EP / PP x EP logits equal HF's."""
from pathlib import Path

import pytest
import torch

from dapo_megatron.models import moe
from dapo_megatron.models.hf_config import UnsupportedModelError, arch_from_hf, check_parallel_sizes
from dapo_megatron.models.tiny import make_tiny_hf_model, tiny_config_dict
from dapo_megatron.models.weights import expected_hf_names

REPO = Path(__file__).resolve().parents[1]
LOGITS = REPO / "tests" / "dist_scripts" / "moe_logits.py"


def test_qwen3_moe_arch_from_hf():
    arch = arch_from_hf(tiny_config_dict("qwen3_moe", 128))
    m = arch.moe
    assert (arch.qk_layernorm, arch.qkv_bias) == (True, False)
    assert (m.num_experts, m.topk, m.ffn_hidden_size, m.shared_expert_size, m.norm_topk_prob) == (8, 2, 48, None, True)
    assert m.layer_pattern == (1, 0, 1, 1)  # mlp_only_layers=[1]
    kw = moe.transformer_config_kwargs(m, moe.MoEOptions(), on_gpu=False)
    # norm_topk_prob=True: top-k over logits then softmax over the k (= renormalised top-k probabilities)
    assert (kw["moe_router_pre_softmax"], kw["moe_aux_loss_coeff"], kw["moe_grouped_gemm"]) == (False, 0.001, False)
    assert kw["moe_token_dispatcher_type"] == "alltoall" and kw["moe_expert_capacity_factor"] is None
    assert "moe_shared_expert_intermediate_size" not in kw


def test_qwen2_moe_arch_and_sparse_step():
    arch = arch_from_hf(tiny_config_dict("qwen2_moe", 128, decoder_sparse_step=2))
    assert (arch.qkv_bias, arch.qk_layernorm, arch.moe.shared_expert_size, arch.moe.shared_expert_gate) == \
        (True, False, 96, True)
    assert arch.moe.layer_pattern == (0, 1, 0, 1)  # HF: MoE where (i + 1) % decoder_sparse_step == 0
    kw = moe.transformer_config_kwargs(arch.moe, moe.MoEOptions(moe_z_loss_coeff=1e-3,
                                                                moe_expert_capacity_factor=1.5), on_gpu=False)
    assert kw["moe_router_pre_softmax"] is True  # norm_topk_prob=False: softmax over all experts, no renorm
    assert (kw["moe_shared_expert_intermediate_size"], kw["moe_shared_expert_gate"]) == (96, True)
    assert (kw["moe_z_loss_coeff"], kw["moe_expert_capacity_factor"]) == (1e-3, 1.5)
    names = expected_hf_names(arch)
    assert "model.layers.1.mlp.shared_expert_gate.weight" in names and "model.layers.1.mlp.experts.3.up_proj.weight" \
        in names and "model.layers.0.mlp.gate_proj.weight" in names and "model.layers.0.mlp.gate.weight" not in names


def test_transformers5_num_local_experts_spelling():
    cfg = tiny_config_dict("qwen3_moe", 128)
    cfg["num_local_experts"] = cfg.pop("num_experts")
    assert arch_from_hf(cfg).moe.num_experts == 8


@pytest.mark.parametrize("family, change, match", [
    ("qwen3_moe", {"num_experts_per_tok": 9}, "num_experts_per_tok=9 must be between 1 and num_experts=8"),
    ("qwen3_moe", {"scoring_func": "sigmoid"}, "scoring_func='sigmoid' is not supported"),
    ("qwen3_moe", {"shared_expert_intermediate_size": 64}, "Qwen3-MoE has no shared expert"),
    ("qwen2_moe", {"shared_expert_intermediate_size": 0}, "needs a shared expert"),
    ("qwen2_moe", {"mlp_only_layers": [7]}, "mlp_only_layers"),
])
def test_bad_moe_config_is_refused(family, change, match):
    with pytest.raises(UnsupportedModelError, match=match):
        arch_from_hf(tiny_config_dict(family, 128, **change))


def test_expert_parallel_sizes_are_checked():
    arch = arch_from_hf(tiny_config_dict("qwen3_moe", 128))  # 8 experts, moe_intermediate_size 48
    check_parallel_sizes(arch, 2, 2, ep=4)
    with pytest.raises(UnsupportedModelError, match="expert_model_parallel_size=3 must divide num_experts=8"):
        check_parallel_sizes(arch, 1, 1, ep=3)
    with pytest.raises(UnsupportedModelError, match="expert_tensor_parallel_size=5 must divide moe_intermediate"):
        check_parallel_sizes(arch, 1, 1, ep=1, etp=5)
    dense = arch_from_hf(tiny_config_dict("qwen3", 128))
    with pytest.raises(UnsupportedModelError, match="expert_model_parallel_size=2 needs a mixture-of-experts"):
        check_parallel_sizes(dense, 1, 1, ep=2)


@pytest.mark.parametrize("opts, match", [
    (dict(moe_router_score_function="sigmoid"), "moe_router_score_function='sigmoid' is not supported"),
    (dict(moe_token_dispatcher_type="flex"), "moe_token_dispatcher_type='flex'"),
    (dict(moe_grouped_gemm=True), "moe_grouped_gemm=true needs a GPU"),
    (dict(moe_expert_capacity_factor=0.0), "moe_expert_capacity_factor=0.0 must be > 0"),
    (dict(moe_router_load_balancing_type="sinkhorn"), "moe_router_load_balancing_type='sinkhorn'"),
])
def test_bad_moe_options_are_refused(opts, match):
    arch = arch_from_hf(tiny_config_dict("qwen3_moe", 128))
    with pytest.raises(ValueError, match=match):
        moe.check_options(moe.MoEOptions(**opts), arch.moe, on_gpu=False)
    with pytest.raises(ValueError, match="has no experts"):
        moe.check_options(moe.MoEOptions(moe_z_loss_coeff=1e-3), None, on_gpu=False)


def test_unknown_expert_layouts_are_named():
    assert "fused in-memory expert layout" in moe.unknown_layout_hint(["model.layers.0.mlp.experts.gate_up_proj"])
    assert "shared_experts" in moe.unknown_layout_hint(["model.layers.0.mlp.shared_experts.up_proj.weight"])
    assert moe.unknown_layout_hint(["model.layers.0.mlp.experts.0.up_proj.weight"]) is None


def _hf_logits(hf_dir, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


MOE_LAYOUTS = [  # tp, pp, ep, etp, nproc
    (1, 1, 2, 1, 2),  # EP=2 (DP=2)
    (2, 1, 2, 1, 2),  # TP=2 x EP=2 with expert TP 1 (sequence parallel on, uneven dispatch splits)
    (2, 1, 2, 2, 4),  # TP=2 x EP=2 with expert TP 2
    (1, 2, 2, 1, 4),  # PP=2 x EP=2 (DP=2)
]


def _moe_case(family, layout):
    # default suite: every layout but expert TP 2 for Qwen3-MoE, EP=2 for Qwen2-MoE (the shared expert); the rest slow
    default = layout[3] == 1 and (family == "qwen3_moe" or layout[:2] == (1, 1))
    return pytest.param(*layout, family, marks=() if default else pytest.mark.slow,
                        id="-".join(map(str, (*layout, family))))


@pytest.mark.dist
@pytest.mark.parametrize("tp, pp, ep, etp, nproc, family",
                         [_moe_case(f, layout) for layout in MOE_LAYOUTS for f in ("qwen3_moe", "qwen2_moe")])
def test_moe_logits_equal_hf(torchrun, tmp_path, family, tp, pp, ep, etp, nproc):
    """Logits at EP=2, TP=2 x EP=2, PP=2 x EP=2 equal HF's; the weight sync returns every HF tensor bit for bit."""
    hf_dir = make_tiny_hf_model(tmp_path / family, family, seed=3)
    out = tmp_path / "logits.pt"
    torchrun(LOGITS, nproc, hf_dir, tp, pp, ep, etp, out)
    got = torch.load(out)
    ref = _hf_logits(hf_dir, got["ids"])
    assert (got["logits"] - ref).abs().max().item() < 1e-4


STEP = REPO / "tests" / "dist_scripts" / "moe_step.py"


@pytest.mark.dist
@pytest.mark.slow
def test_optimizer_step_at_ep2_equals_ep1(torchrun, tmp_path):
    """One DAPO step of the Actor (DDP + megatron optimizer, expert grads reduced over the expert-DP group)."""
    hf_dir = make_tiny_hf_model(tmp_path / "hf", "qwen2_moe", seed=3)
    runs = {}
    for ep in (1, 2):
        torchrun(STEP, 2, hf_dir, ep, tmp_path / f"ep{ep}.pt", env={"DAPO_DUMP_GRADS": "1"})  # DP=2 both times
        runs[ep] = torch.load(tmp_path / f"ep{ep}.pt")
    a, b = runs[1], runs[2]
    from safetensors.torch import load_file

    init = load_file(str(hf_dir / "model.safetensors"))
    assert a["weights"].keys() == b["weights"].keys() == init.keys()
    assert abs(a["metrics"]["actor/grad_norm"] / b["metrics"]["actor/grad_norm"] - 1) < 1e-6
    assert max(abs(x - y) for ra, rb in zip(a["old"], b["old"]) for x, y in zip(ra, rb)) < 1e-6
    total = sum(t.numel() for t in init.values())
    over = sum(int(((a["weights"][k] - b["weights"][k]).abs() > 1e-6).sum()) for k in init)
    worst = max(float((a["weights"][k] - b["weights"][k]).abs().max()) for k in init)
    moved = min(float((a["weights"][k] - init[k]).abs().max()) for k in init if ".experts." in k)
    assert moved > 1e-4  # every expert weight tensor was trained
    # The gradients agree to fp32 summation order (measured max |d| 1.9e-8, largest gradient 0.21). Adam's first
    # step is lr * g / (|g| + eps), so an element whose gradient is ~eps turns that noise into ~1e-6 of weight:
    # measured worst 9.7e-7 (layer 0 k_proj.bias), 0 elements above 1e-6. The noise floor of the same step with only
    # the summation order changed (EP=1, micro_batch_size 1 vs 2, aux loss off: the same math) is 2.8e-6, 13
    # elements above 1e-6 (tools/moe_ep_noise.py). Before the aux-loss scale fix (moe_metrics.py) the routers' aux
    # gradient was summed over micro-batches and DP ranks and EP=2 vs EP=1 measured 8.4e-6.
    gmax = max(float((a["grads"][k] - b["grads"][k]).abs().max()) for k in init)
    assert gmax < 1e-7, gmax
    assert over == 0 and worst < 1e-6, (over, total, worst)


def test_sglang_launcher_passes_ep_size():
    from dapo_megatron.rollout.sglang_launcher import SGLangServers

    cmd = SGLangServers("/m", tp_size=8, ep_size=8).server_command(0)
    assert cmd[cmd.index("--ep-size") + 1] == "8"
    assert "--ep-size" not in SGLangServers("/m", tp_size=8).server_command(0)
    with pytest.raises(ValueError, match="ep_size=3 must divide tp_size=8"):
        SGLangServers("/m", tp_size=8, ep_size=3)


AUX = REPO / "tests" / "dist_scripts" / "moe_aux_grad.py"


@pytest.mark.dist
def test_aux_loss_gradient_is_the_token_weighted_mean(torchrun, tmp_path):
    """Zero advantages: only the load-balancing loss trains the routers. Their gradient equals coeff x the gradient of
    megatron's switch loss per micro-batch, weighted by its share of the step's router tokens (2 micro-batches).
    Without the actor's aux-loss scale it was (router tokens per micro-batch) times larger."""
    hf_dir = make_tiny_hf_model(tmp_path / "hf", "qwen3_moe", seed=3)
    torchrun(AUX, 1, hf_dir, tmp_path / "aux.pt")
    got = torch.load(tmp_path / "aux.pt")
    assert got["grad_scale"] > 1e-4
    assert got["max_abs_err"] < 1e-7, got  # the last MoE layer's router: its own aux loss only
    assert all(abs(r - 1) < 1e-3 for r in got["ratios"]), got["ratios"]  # before: 2.0 (the sum over 2 micro-batches)
    m = got["metrics"]
    assert m["moe/aux_loss"] > 0 and m["moe/load_max_over_mean/layer_0"] >= 1.0
    assert "moe/dropped_tokens" not in m and "moe/load_max_over_mean/layer_1" not in m  # layer 1 is dense


@pytest.mark.dist
@pytest.mark.slow
def test_optimizer_step_at_tp2_ep2_equals_ep2(torchrun, tmp_path):
    """TP=2 x EP=2 (sequence parallel; the response-only LM head gathers the sequence shards) against EP=2 at DP=2,
    aux loss off (DP=1 vs DP=2 puts other samples together in a micro-batch, which changes the aux loss's
    statistics). Measured: gradients 3.4e-8 apart (largest 0.21), grad norm 1.8e-7 relative, weights 4.4e-6
    (Adam's first step on gradients ~eps, see test_optimizer_step_at_ep2_equals_ep1)."""
    hf_dir = make_tiny_hf_model(tmp_path / "hf", "qwen2_moe", seed=3)
    runs = {}
    for name, ep, tp in (("ep2", 2, 1), ("tp2ep2", 2, 2)):
        torchrun(STEP, 2, hf_dir, ep, tmp_path / f"{name}.pt", 2, 0.0, tp, env={"DAPO_DUMP_GRADS": "1"})
        runs[name] = torch.load(tmp_path / f"{name}.pt")
    a, b = runs["ep2"], runs["tp2ep2"]
    assert a["grads"].keys() == b["grads"].keys() and len(a["grads"]) > 0
    assert max(float((a["grads"][k] - b["grads"][k]).abs().max()) for k in a["grads"]) < 1e-7
    assert abs(a["metrics"]["actor/grad_norm"] / b["metrics"]["actor/grad_norm"] - 1) < 1e-6
    assert max(abs(x - y) for ra, rb in zip(a["old"], b["old"]) for x, y in zip(ra, rb)) < 1e-6
    assert max(float((a["weights"][k] - b["weights"][k]).abs().max()) for k in a["weights"]) < 1e-5
