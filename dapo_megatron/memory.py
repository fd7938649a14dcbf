"""Peak GPU memory of each pipeline stage's busiest rank, estimated before launch (`dapo-megatron plan`, `train`).

Pure arithmetic on the model's shape (models/hf_config.ModelArch) and the run's settings (`shape_of(cfg, ...)`);
nothing here imports megatron or starts a process. Terms, per GPU of a stage (all TP ranks of a stage hold the same):

- model states (Megatron-LM's accounting): weights in their dtype; grads in fp32 (the DDP grad buffer: megatron
  accumulates and reduces them in fp32, grad_reduce_in_fp32); Adam's fp32 moments, plus an fp32 master copy when the
  weights are bf16, sharded over data parallel by the distributed optimizer (expert weights over the expert-data-
  parallel ranks). bf16: 2 + 4 + 12 = 18 bytes per parameter, 6 + 12/DP with the distributed optimizer.
- the frozen reference model (algorithm.kl_coef > 0): its weights only.
- activations: Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"), Table 2,
  written out for our layers instead of GPT's: RMSNorm inputs and the linear layers' inputs (4h per token, /TP with
  sequence parallelism), q, k, v and the attention output (/TP), the SwiGLU input and output (3 ffn /TP), no dropout
  masks (dropout is 0). With flash attention (GPU) there is no s^2 term; the CPU's local attention keeps its softmax
  (heads/TP x s^2 per sequence). GPT's shapes give Table 2's s·h·(10 + 24/t) minus the 2 dropout bytes.
  Selective recompute (megatron's core_attn) drops the attention's own buffers; full recompute keeps each
  recompute unit's input (h per token, /TP with SP) plus one unit's activations during its backward.
  1F1B keeps min(PP - stage, micro-batches) micro-batches in flight: the first stage holds PP of them.
- LM head: the logits of one micro-batch's response tokens ([N, V/TP], in the activations' dtype, saved for the
  log-prob backward; train/head.py computes no other rows), the gradient of the same size (built in place for fp32
  logits) and two [chunk, V/TP] fp32 buffers of the chunked log-prob (train/logprobs.py).
- colocated engines: at start-up SGLang sizes its KV cache so that the whole GPU's use reaches
  rollout.sglang_mem_fraction_static x G (the actor is built first: its weights, grads and master weights count in
  it; Adam's moments, allocated at the first step, come on top when the engines resume); the engines release that
  memory while the actor trains (train/loop.py: `colocated`). The GPU's peak is the larger of the two phases, and
  the engines' KV cache is what the fraction leaves after the actor and the engine's weights.
"""
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

GIB = 2 ** 30


@dataclass(frozen=True)
class Shape:
    """What the estimate needs to know of a run (built from the config by `shape_of`)."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    etp: int = 1
    sp: bool = False
    dist_opt: bool = False
    param_bytes: int = 2  # weights and activations: 2 (bf16, GPU) or 4 (fp32, CPU)
    on_gpu: bool = True  # Transformer Engine: flash attention, fused RoPE; else megatron's local (CPU) layers
    recompute: Optional[str] = None  # None | selective | full
    recompute_method: Optional[str] = None  # uniform | block
    recompute_num_layers: Optional[int] = None
    routing_replay: bool = False  # MoE routing replay: no full recompute (actor.py refuses it)
    seq_lens: tuple = (1024,)  # the sequences of one micro-batch (padded: each padded to the micro-batch's length)
    packed: bool = True
    longest: int = 1024  # the longest sequence: a micro-batch never holds fewer tokens
    response_tokens: int = 1024  # LM-head rows of one micro-batch
    num_microbatches: int = 1  # per data-parallel rank per optimizer step
    logprob_chunk: int = 512
    padded_vocab: int = 0  # megatron's padded vocabulary (0: the model's)
    reference: bool = False
    engine: str = "none"  # none | sglang (colocated SGLang servers) | embedded (in rank 0's process)
    engine_fraction: float = 0.0  # rollout.sglang_mem_fraction_static
    engine_tp: int = 1
    gpu_gib: float = 80.0

    @property
    def tokens(self) -> int:
        return sum(self.seq_lens) if self.packed else len(self.seq_lens) * max(self.seq_lens)


@dataclass
class StageMemory:
    stage: int
    weights: float  # bytes, like every term
    grads: float
    optimizer: float
    reference: float
    activations: float  # all in-flight micro-batches, plus a recompute unit during its backward
    logits: float
    engine: float
    total: float
    activations_per_microbatch: float = 0.0
    in_flight: int = 1
    kv_cache: Optional[float] = None  # colocated SGLang: what the fraction leaves for the engines' KV cache
    rollout: Optional[float] = None  # colocated SGLang: the GPU's use while the engines generate

    def terms(self) -> dict:
        return {"weights": self.weights, "grads": self.grads, "optimizer": self.optimizer,
                "reference": self.reference, "activations": self.activations, "logits": self.logits,
                "engine": self.engine}

    def largest(self) -> str:
        """The largest term of the phase that sets the peak (training, or colocated engines generating)."""
        terms = self.terms()
        if self.kv_cache is not None:  # colocated SGLang: a phase of its own
            if self.total == self.rollout:
                return "engine"
            terms.pop("engine")
        return max(terms.items(), key=lambda kv: kv[1])[0]

    def to_json(self) -> dict:
        out = {"stage": self.stage}
        out.update({f"{k}_gib": round(v / GIB, 3) for k, v in self.terms().items()})
        out["total_gib"] = round(self.total / GIB, 3)
        out["activations_per_microbatch_gib"] = round(self.activations_per_microbatch / GIB, 3)
        out["microbatches_in_flight"] = self.in_flight
        if self.kv_cache is not None:
            out["kv_cache_gib"] = round(self.kv_cache / GIB, 3)
        return out


@dataclass
class MemoryPlan:
    shape: Shape
    stages: list = field(default_factory=list)

    @property
    def gpu_bytes(self) -> float:
        return self.shape.gpu_gib * GIB

    def over(self) -> list:
        """Stages that do not fit: over the GPU, or no KV cache left to colocated engines."""
        return [s for s in self.stages if s.total > self.gpu_bytes or (s.kv_cache is not None and s.kv_cache <= 0)]

    @property
    def fits(self) -> bool:
        return not self.over()

    def to_json(self) -> dict:
        return {"gpu_gib": self.shape.gpu_gib, "fits": self.fits, "stages": [s.to_json() for s in self.stages]}

    def describe(self) -> str:
        s = self.shape
        where = f"per GPU, {s.gpu_gib:g} GiB" if math.isfinite(s.gpu_gib) else "per process, CPU"
        lines = [f"memory ({where}; {'bf16' if s.param_bytes == 2 else 'fp32'} weights, "
                 f"{'distributed optimizer' if s.dist_opt else 'optimizer not sharded'}, SP "
                 f"{'on' if s.sp else 'off'}, recompute {s.recompute or 'none'}, {s.tokens} tokens per micro-batch):"]
        unit, size = ("GiB", GIB) if max(st.total for st in self.stages) >= GIB else ("MiB", 2 ** 20)
        for st in self.stages:
            terms = ", ".join(f"{k} {v / size:.1f}" for k, v in st.terms().items() if v)
            kv = f"; engines' KV cache {st.kv_cache / size:.1f}" if st.kv_cache is not None else ""
            lines.append(f"  stage {st.stage}: {st.total / size:.1f} {unit} = {terms} ({unit}; {st.in_flight} "
                         f"micro-batch(es) in flight){kv}")
        if s.engine == "sglang":
            lines.append(f"  colocated engines fill the GPU to rollout.sglang_mem_fraction_static={s.engine_fraction:g} "
                         "at start-up (the actor's weights, grads and master weights included; Adam's moments come "
                         "later, on top) and release it while the actor trains: the peak is the larger phase")
        return "\n".join(lines)


# ---- parameters ------------------------------------------------------------------------------------------------
def layer_params(arch, layer: int, tp: int, ep: int, etp: int) -> tuple:
    """(dense, expert) parameters of one transformer layer on one rank."""
    h, kv = arch.hidden_size, arch.kv_channels
    a, g = arch.num_attention_heads, arch.num_query_groups
    qkv = h * (a + 2 * g) * kv + ((a + 2 * g) * kv if arch.qkv_bias else 0)
    dense = (qkv + a * kv * h) / tp + 2 * h + (2 * kv if arch.qk_layernorm else 0)  # + input / pre-MLP norms
    moe = arch.moe
    if moe is None or not moe.is_moe_layer(layer):
        return dense + 3 * h * arch.ffn_hidden_size / tp, 0.0
    dense += moe.num_experts * h  # the router: replicated over TP
    if moe.shared_expert_size:
        dense += 3 * h * moe.shared_expert_size / tp + (h if moe.shared_expert_gate else 0)
    return dense, moe.num_experts / ep * 3 * h * moe.ffn_hidden_size / etp


def stage_params(arch, stage: int, s: Shape) -> tuple:
    """(dense, expert) parameters on one rank of pipeline stage `stage`."""
    per = arch.num_layers // s.pp
    dense = expert = 0.0
    for layer in range(stage * per, (stage + 1) * per):
        d, e = layer_params(arch, layer, s.tp, s.ep, s.etp)
        dense, expert = dense + d, expert + e
    vocab = s.padded_vocab or arch.vocab_size
    if stage == 0:
        dense += vocab * arch.hidden_size / s.tp
    if stage == s.pp - 1:
        dense += arch.hidden_size  # final norm
        if not (arch.tie_word_embeddings and s.pp == 1):  # tied at PP > 1: the last stage keeps its own copy
            dense += vocab * arch.hidden_size / s.tp
    return dense, expert


def total_params(arch) -> float:
    s = Shape(padded_vocab=arch.vocab_size)
    return sum(stage_params(arch, 0, s))


def model_states(arch, stage: int, s: Shape) -> tuple:
    """(weights, grads, optimizer) bytes on one rank of `stage`."""
    dense, expert = stage_params(arch, stage, s)
    n = dense + expert
    adam = 8 + (4 if s.param_bytes < 4 else 0)  # m, v (+ an fp32 master copy of bf16 weights)
    expert_dp = max(1, s.dp * s.tp // (s.etp * s.ep))  # megatron carves EP x ETP out of DP x TP
    shard = (dense / s.dp + expert / expert_dp) if s.dist_opt else n
    return n * s.param_bytes, n * 4.0, shard * adam


# ---- activations -----------------------------------------------------------------------------------------------
def layer_activations(arch, layer: int, s: Shape) -> float:
    """Bytes one transformer layer saves for backward over one micro-batch (no full recompute).

    GPU (Transformer Engine, fused SwiGLU and RoPE, flash attention): per token, the norms' inputs and outputs (4h,
    /TP with SP), q and k after RoPE and the fused qkv output (v views it), the attention output, the SwiGLU input
    (2 ffn) and output (ffn), /TP, and flash attention's fp32 log-sum-exp. CPU (megatron's local layers, measured by
    tools/mem_check.py): torch's RMSNorm also keeps x/rms, the unfused SwiGLU two more ffn-sized tensors, RoPE its
    cos/sin, and the local attention (without selective recompute) q plus k and v repeated to every head, its
    softmax (heads/TP x s^2 per sequence) and the causal mask.
    """
    h, kv, b, t = arch.hidden_size, arch.kv_channels, s.param_bytes, s.tp
    q, g = arch.num_attention_heads * kv / t, arch.num_query_groups * kv / t
    T, sp = s.tokens, (s.tp if s.sp else 1)
    gpu, selective = s.on_gpu, s.recompute == "selective"
    elems = (4 if gpu else 6) * h * T / sp  # two norms: input, output (and x/rms on CPU)
    if gpu or selective or q == g:
        elems += (q + g + q + 2 * g) * T  # q, k after RoPE; the qkv output that v views
    else:
        elems += 3 * q * T  # CPU attention: q, k and v repeated to every head
    elems += q * T  # the attention output (the projection's input)
    if arch.qk_layernorm:
        elems += (q + g) * T * (1 if gpu else 2)
    moe = arch.moe
    if moe is not None and moe.is_moe_layer(layer):
        routed = moe.topk * T / sp  # token copies this rank's experts see (balanced over EP)
        elems += routed * (2 * h + (3 if gpu else 5) * moe.ffn_hidden_size / s.etp)  # in, SwiGLU, expert output
        elems += 2 * moe.num_experts * T / sp * 4 / b  # router logits and probabilities (fp32)
        if moe.shared_expert_size:
            elems += (3 if gpu else 5) * moe.shared_expert_size * T / t
    else:
        elems += (3 if gpu else 5) * arch.ffn_hidden_size * T / t
    out = elems * b + 2 * 4.0 * T / sp  # + the norms' fp32 1/rms
    if gpu:
        return out + (0.0 if selective else 4.0 * q / kv * T)  # flash attention's log-sum-exp (fp32)
    out += 4 * kv * (T if s.packed else max(s.seq_lens)) * b  # unfused RoPE: cos, sin (q and k; padded: one row)
    if selective:
        return out
    heads = q / kv
    if s.packed:  # one causal softmax and mask per sequence
        return out + sum(heads * n * n * b + n * n for n in s.seq_lens)
    n = max(s.seq_lens)
    return out + len(s.seq_lens) * heads * n * n * b + n * n  # one mask for the batch


def _stage_layers(arch, stage: int, s: Shape) -> list:
    per = arch.num_layers // s.pp
    return list(range(stage * per, (stage + 1) * per))


def stage_activations(arch, stage: int, s: Shape) -> tuple:
    """(bytes saved over one micro-batch, bytes live only during one recompute unit's backward) on `stage`."""
    layers = _stage_layers(arch, stage, s)
    h, T, b, sp = arch.hidden_size, s.tokens, s.param_bytes, (s.tp if s.sp else 1)
    per = [layer_activations(arch, i, s) for i in layers]
    unit_input = h * T / sp * b
    if s.recompute == "full":
        n = s.recompute_num_layers or 1
        if s.recompute_method == "block":  # the first n layers keep only their input, the rest everything
            n = min(n, len(layers))
            saved, transient = n * unit_input + sum(per[n:]), max(per[:n], default=0.0)
        else:  # uniform: every unit of n layers keeps its input; one unit is rebuilt in its backward
            saved = math.ceil(len(layers) / n) * unit_input
            transient = max(sum(per[i:i + n]) for i in range(0, len(layers), n))
    else:
        saved, transient = sum(per), 0.0
    if stage == 0:
        saved += 8.0 * T  # the embedding's token ids (int64)
    if stage == s.pp - 1:  # final norm (its input, x/rms on CPU), the head's input rows, the loss's per-token tensors
        saved += (1 if s.on_gpu else 2) * h * T / sp * b + s.response_tokens * (h * b + 48)
    return saved, transient


def saved_logits(arch, s: Shape) -> float:
    """The logits of one micro-batch's response tokens, saved for the log-prob backward ([N, V/TP])."""
    return s.response_tokens * (s.padded_vocab or arch.vocab_size) / s.tp * s.param_bytes


def logits_bytes(arch, s: Shape) -> float:
    """The last stage's LM-head buffers for one micro-batch: saved logits, their gradient, the chunk buffers."""
    v_local = (s.padded_vocab or arch.vocab_size) / s.tp
    logits = saved_logits(arch, s)
    grad = 0.0 if s.param_bytes == 4 else logits  # fp32 logits: the gradient is built in their own buffer
    return logits + grad + 2 * min(s.logprob_chunk, s.response_tokens) * v_local * 4


# ---- the plan --------------------------------------------------------------------------------------------------
def estimate(arch, s: Shape) -> MemoryPlan:
    plan = MemoryPlan(s)
    gpu = s.gpu_gib * GIB
    for stage in range(s.pp):
        weights, grads, opt = model_states(arch, stage, s)
        ref = weights if s.reference else 0.0
        per_mb, transient = stage_activations(arch, stage, s)
        in_flight = max(1, min(s.pp - stage, s.num_microbatches))
        acts = per_mb * in_flight + transient
        logits = logits_bytes(arch, s) if stage == s.pp - 1 else 0.0
        train = weights + grads + opt + ref + acts + logits
        engine, kv, rollout = 0.0, None, None
        if s.engine == "sglang" and math.isfinite(gpu):
            engine = s.engine_fraction * gpu
            moments = opt * 8 / (8 + (4 if s.param_bytes < 4 else 0))  # Adam's m, v: allocated at the first step
            kv = engine - (weights + grads + opt - moments + ref) - total_params(arch) * 2 / s.engine_tp
            rollout = engine + moments
        elif s.engine == "embedded" and stage == 0:
            engine = total_params(arch) * s.param_bytes  # a full copy of the weights in rank 0's process
        total = max(train, rollout) if rollout is not None else train + engine
        plan.stages.append(StageMemory(stage, weights, grads, opt, ref, acts, logits, engine, total,
                                       activations_per_microbatch=per_mb, in_flight=in_flight, kv_cache=kv,
                                       rollout=rollout))
    return plan


def shape_of(cfg, arch, world: int, on_gpu: bool = True, gpu_gib: float = 80.0) -> Shape:
    """The estimate's view of `cfg` on `world` trainer ranks: the worst-case micro-batch the config allows."""
    from .models.hf_config import padded_vocab_size

    p, a, r = cfg.parallel, cfg.actor, cfg.rollout
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    dp = max(1, world // (tp * pp))
    sp = getattr(p, "sequence_parallel", False)
    # parallel.resolve_sequence_parallel: null = on at TP > 1; MoE layers at TP > 1 always run it
    sp = (tp > 1 if sp is None else bool(sp) and tp > 1) or (arch.moe is not None and tp > 1)
    seq = (cfg.data.max_prompt_length or 0) + r.max_response_length
    if a.max_tokens_per_microbatch:
        budget = max(a.max_tokens_per_microbatch, seq)  # a longer sequence gets a micro-batch of its own
        seq_lens = (budget,)
        response = min(budget, r.max_response_length * math.ceil(budget / (r.max_response_length + 1)))
    else:
        seq_lens, response = (seq,) * a.micro_batch_size, a.micro_batch_size * r.max_response_length
    padded = padded_vocab_size(arch.vocab_size, cfg.model.make_vocab_size_divisible_by, tp)
    chunk = a.logprob_chunk_size or (512 if on_gpu else max(1, 2 ** 24 // (4 * padded // tp)))
    colocated = r.colocate and r.backend != "http"
    engine = "none" if not colocated else r.backend
    return Shape(tp=tp, pp=pp, dp=dp, ep=p.expert_model_parallel_size,
                 etp=p.expert_tensor_parallel_size or tp, sp=sp,
                 dist_opt=on_gpu if a.use_distributed_optimizer is None else a.use_distributed_optimizer,
                 param_bytes=2 if _bf16(a, on_gpu) else 4, on_gpu=on_gpu, recompute=a.recompute_granularity,
                 recompute_method=a.recompute_method, recompute_num_layers=a.recompute_num_layers,
                 routing_replay=a.routing_replay != "none",
                 seq_lens=seq_lens, packed=a.use_remove_padding, longest=seq, response_tokens=response,
                 num_microbatches=max(1, a.global_batch_size // (dp * a.micro_batch_size)), logprob_chunk=chunk,
                 padded_vocab=padded, reference=cfg.algorithm.needs_reference, engine=engine,
                 engine_fraction=r.sglang_mem_fraction_static, engine_tp=r.sglang_tp_size, gpu_gib=gpu_gib)


def _bf16(actor_cfg, on_gpu: bool) -> bool:
    """Megatron's --bf16: actor.bf16 where the config has it (null: on with a GPU), else the device's default."""
    bf16 = getattr(actor_cfg, "bf16", None)
    return on_gpu if bf16 is None else bool(bf16)


def fixes(arch, s: Shape) -> list:
    """The single changes that make an over-budget plan fit, as the settings to write."""
    out = []
    trials = []
    if s.tp > 1 and not s.sp:
        trials.append(("parallel.sequence_parallel=true", replace(s, sp=True)))
    if s.recompute != "full" and not s.routing_replay:
        trials.append(("actor.recompute_granularity=full actor.recompute_method=uniform actor.recompute_num_layers=1",
                       replace(s, recompute="full", recompute_method="uniform", recompute_num_layers=1)))
    if s.dp % 2 == 0 and arch.num_layers % (s.pp * 2) == 0:
        trials.append((f"parallel.pipeline_model_parallel_size={s.pp * 2}", replace(s, pp=s.pp * 2, dp=s.dp // 2)))
    half = max(s.tokens // 2, s.longest)
    if half < s.tokens:
        trials.append((f"actor.max_tokens_per_microbatch={half}",
                       replace(s, seq_lens=(half,), packed=True, response_tokens=min(s.response_tokens, half))))
    for text, trial in trials:
        if estimate(arch, trial).fits:
            out.append(text)
    return out


def refusal(arch, plan: MemoryPlan) -> str:
    """One line: the stage over budget, its largest term and the changes that would fit."""
    st = plan.over()[0]
    if st.kv_cache is not None and st.kv_cache <= 0 and st.total <= plan.gpu_bytes:
        return (f"stage {st.stage}: the colocated engines' rollout.sglang_mem_fraction_static="
                f"{plan.shape.engine_fraction:g} of {plan.shape.gpu_gib:g} GiB leaves no KV cache after the actor's "
                f"{(st.weights + st.grads + st.optimizer + st.reference) / GIB:.1f} GiB of states and the engine's "
                f"weights; raise the fraction, or shard the actor more (TP/PP/EP, distributed optimizer)")
    found = fixes(arch, plan.shape)
    terms = st.terms()
    big = st.largest()
    return (f"stage {st.stage} needs {st.total / GIB:.1f} GiB per GPU, over {plan.shape.gpu_gib:g} GiB; "
            f"largest term: {big} {terms[big] / GIB:.1f} GiB; "
            + (f"fits with any of: {'; '.join(found)}" if found else
               "no single change of SP, recompute, PP or max_tokens_per_microbatch fits: use more GPUs or shorter "
               "sequences"))


def to_dict(s: Shape) -> dict:
    return asdict(s)
