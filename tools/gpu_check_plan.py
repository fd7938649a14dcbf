"""The GPU check's plan (stages and their time budgets) and the model-FLOPs formula behind its MFU; imported by
tools/gpu_check.py (the driver) and tools/gpu_check_stages.py (the stage bodies): the driver imports the stages,
the stages import only this, so no import goes both ways.

Model FLOPs (stated once, used for MFU; dense decoder, GQA attention, SwiGLU MLP, causal attention, no recompute):
    per token, forward = L * (2 h (q + 2 kv)        QKV projections      q = heads * head_dim, kv = kv_heads * head_dim
                              + 2 q h               attention output projection
                              + 2 s q               QK^T and AV over a causal window (s/2 keys on average, x2 matmuls)
                              + 6 h f)              SwiGLU gate, up, down
                         + 2 h V                    LM head
    train step = 3 x forward (backward = 2 x forward).   MFU = train FLOPs/token x tokens/s / peak bf16 FLOP/s.
"""
from dataclasses import dataclass

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12}  # dense, SXM


@dataclass
class Stage:
    name: str
    budget_s: int
    what: str


PLAN = [
    Stage("stage1_gpu_tests", 130, "pytest -m gpu (TE layers, real SGLang servers, CUDA IPC and NCCL weight sync, "
          "memory estimate vs measured: tests/test_memory_measured.py)"),
    Stage("stage2_te_fp8", 60, "TE layer spec fwd/bwd in bf16, FP8 e4m3 delayed and current scaling; logits vs "
          "local spec; step time"),
    Stage("stage3_dapo", 200, "3 DAPO steps, Qwen2.5-0.5B shape, bf16 + fp32 master + distributed optimizer, FP8, "
          "real sglang, per weight-sync mode: tensor (CUDA IPC, colocated: release/resume), distributed (NCCL, "
          "engine on GPU 1; >= 2 GPUs), disk; log-prob gap, peak memory per side"),
    Stage("stage4_mfu", 40, "train-step MFU and tokens/s from the model-FLOPs formula"),
    Stage("stage5_sync_gbps", 10, "weight-sync GB/s per mode, from stage 3's runs against the real sglang server"),
]


@dataclass
class ModelShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int


QWEN25_05B = ModelShape(layers=24, hidden=896, heads=14, kv_heads=2, head_dim=64, ffn=4864, vocab=151936)


def forward_flops_per_token(m: ModelShape, seq_len: int) -> float:
    """Forward FLOPs of one token at sequence length `seq_len` (formula in the module docstring)."""
    q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
    per_layer = 2 * m.hidden * (q + 2 * kv) + 2 * q * m.hidden + 2 * seq_len * q + 6 * m.hidden * m.ffn
    return m.layers * per_layer + 2 * m.hidden * m.vocab


def train_flops_per_token(m: ModelShape, seq_len: int) -> float:
    return 3 * forward_flops_per_token(m, seq_len)


def mfu(m: ModelShape, seq_len: int, tokens_per_s: float, peak_flops: float) -> float:
    return train_flops_per_token(m, seq_len) * tokens_per_s / peak_flops


def peak_flops_for(device_name: str) -> float:
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), PEAK_BF16_FLOPS["H100"])
