"""`bigray plan`: what one training worker holds in GPU memory, whether it fits, and the largest batch that does.

Every figure is bytes per GPU (one Ray Train worker = one DeepSpeed rank), for a Llama-style decoder (HF
`LlamaForCausalLM` and its relatives) trained with AdamW under DeepSpeed ZeRO as `bigray/train/zero.py`
configures it. Notation: N parameters, D = train.num_workers (data-parallel ranks), T = micro_batch_size x
seq_len tokens per micro step, H hidden, Hkv = H x kv_heads / heads, I the MLP width, L layers, V vocab; a = 2
bytes per weight and activation in bf16/fp16 (4 in fp32).

Model state (Rajbhandari et al., "ZeRO", 2020, with DeepSpeed's actual dtypes):
- weights: a·N, a·N/D under ZeRO-3, 0 with offload_params (they live in CPU RAM, ZeRO-3 only).
- gradients: g bytes each, g = 4 when bf16 runs accumulate in fp32 (zero.py's default for ZeRO >= 1,
  `data_types.grad_accum_dtype`), else a. ZeRO-0 and ZeRO-1 keep them whole (g·N: ZeRO-1 only shards the
  optimizer; its bf16 optimizer keeps a full fp32 accumulation buffer), ZeRO-2/3 keep their 1/D partition
  (g·N/D); with offload_optimizer the partition lives in CPU RAM beside the optimizer.
- optimizer: k·N with k = 12 in mixed precision (fp32 master weights 4 + Adam m 4 + v 4) or 8 in fp32
  (the weights are the master), /D from ZeRO-1 on, 0 on the GPU with offload_optimizer.

Activations saved for backward, per token per layer (bf16 derivation; same tensors at a = 4 in fp32):
- each RMSNorm (two per layer): HF's upcasts its input to fp32 and saves it (4H), saves the normalised
  bf16 value the weight multiplies (aH) and its output is saved by the next matmuls (aH): 4H + 2aH.
- attention: q (aH), k and v after RoPE (2·aHkv) and SDPA's output (aH), kept by the flash / memory-efficient
  kernels (no S x S scores), and o_proj's input, a contiguous copy of it (aH): a(3H + 2Hkv).
- MLP (SwiGLU): gate's output (saved by SiLU), SiLU's output and up's output (saved by the product) and the
  product (saved by down_proj): 4aI.
- layer = 8H + a(7H + 2Hkv + 4I): 112.6 kB/token for the 1b preset (16 layers: 1.8 MB/token).
- with train.compile, inductor fuses each norm (saves its bf16 input and output: 2aH) and SiLU x up (saves
  gate, up and product: 3aI): layer = a(7H + 2Hkv + 3I), 79.9 kB for 1b.
- saved = L·layer + the final norm (4H + 2aH); with activation checkpointing (HF's, per decoder layer) each
  layer keeps only its input: L·aH + the final norm.
- layer backward: one layer's gradient temporaries, a(2H + 3I), plus with activation checkpointing the one
  layer recomputed at a time (layer).

Peak: the loss's backward runs first, while every saved activation is alive and before any layer's backward,
so the dynamic peak is saved + max(logits and loss, layer backward), not their sum. Against README's H100
runs (torch's max allocated, bf16 gradients as they had then): 1b micro batch 8: 49.5 predicted / 48.1 GiB
measured; 1b mb 16 compiled: 67.3 / 66.1; 1b mb 32 compiled + checkpointing: 44.8 / 42.1; 125m mb 8: 14.7 /
14.0; 125m mb 16 compiled, ZeRO-3: 23.8 / 25.9 (tests/unit/test_plan.py keeps all eight within 10%).

Logits and loss per micro step (`train.loss_impl`, bigray/train/loss.py):
- plain: 12 bytes per logit (T·V of them). Forward holds the model's logits, their fp32 copy and the fp32
  log-softmax (a + 8); backward's peak holds the saved log-softmax, its incoming gradient and the gradient of
  the fp32 logits (3 x 4 bytes). Measured on CPU: 771 MiB for T = 2048, V = 32768 (formula 768).
- chunked: the same 12 bytes per logit for one chunk of c = T / ceil(V/H) tokens, plus the lm_head gradient
  summed over chunks before it reaches the parameter (running sum + the chunk's own: 2·a·V·H) and the
  gradient of the hidden states gathered from the chunks (2·aTH).
- liger: two fp32 chunks of logits (8 bytes per logit of one chunk) while its forward computes the gradients,
  which it then holds until backward: the hidden-state gradient (aTH) and the lm_head gradient in fp32 (4VH).

Framework overhead:
- CUDA context, cuBLAS workspaces and NCCL's buffers, outside PyTorch's allocator: CUDA_CONTEXT_GIB.
- DeepSpeed's buckets, sized in zero.py: the gradient reduce bucket (g bytes per element, two with overlap_comm)
  and the all-gather bucket (a bytes) from ZeRO-1 on; under ZeRO-3 also the parameters gathered for compute:
  two layers (the running one and the prefetched one), the prefetch bucket and the embedding, capped by
  stage3_max_live_parameters.
- the caching allocator's rounding and fragmentation: FRAGMENTATION x the dynamic peak.
The context and the fragmentation are outside torch's max_memory_allocated (the `memory_gb` bigray logs on
GPU): `MemoryPlan.peak_allocated` is the figure to compare with it, `MemoryPlan.total` what must fit.

Throughput: tokens/s per GPU = MFU x peak FLOP/s / FLOPs per token, with bigray/train/model.py's count (6N +
12·L·H·seq). Recompute is paid at the same rate: activation checkpointing adds a forward pass of the layers
(2·N_layers + 4·L·H·seq per token), chunked adds one lm_head forward (2·V·H). The optimizer step, and with
offload the CPU Adam and the PCIe copies, are not modelled.
"""

from __future__ import annotations

from dataclasses import dataclass

from bigray.config import Config, DataConfig, ModelConfig, TrainConfig
from bigray.errors import ConfigError
from bigray.storage import Store, join
from bigray.train.loss import chunk_tokens, resolve_loss_impl
from bigray.train.metrics import peak_flops
from bigray.train.model import flops_per_token, model_config
from bigray.train.zero import deepspeed_config

GIB = 2**30
CUDA_CONTEXT_GIB = 1.0
FRAGMENTATION = 0.05
ASSUMED_MFU = 0.40
DEFAULT_PEAK_TFLOPS = 989.0  # H100 SXM dense bf16, when neither train.peak_tflops nor a visible GPU says otherwise


@dataclass(frozen=True)
class ModelShape:
    """What the formulas need from a model: its exact parameter count and its layer shapes."""

    n_params: int
    layer_params: int
    embed_params: int
    vocab_size: int
    hidden_size: int
    num_layers: int
    kv_hidden: int
    intermediate_size: int
    flops_per_token: float
    seq_len: int


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per GPU of one configuration, whether it fits, and what it should reach."""

    micro_batch_size: int
    grad_accum_steps: int
    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    activation_checkpointing: bool
    loss_impl: str
    precision: str
    world: int
    params: float
    grads: float
    optimizer: float
    activations: float
    layer_backward: float
    logits: float
    buckets: float
    reserved: float
    cpu_offloaded: float
    gpu_memory: float | None
    tokens_per_s: float | None
    mfu: float

    @property
    def peak_allocated(self) -> float:
        """What torch's allocator peaks at: state, buckets, saved activations and the larger backward phase."""
        state = self.params + self.grads + self.optimizer + self.buckets
        return state + self.activations + max(self.logits, self.layer_backward)

    @property
    def total(self) -> float:
        """What must fit in the GPU: the allocator's peak plus the CUDA context and fragmentation."""
        return self.peak_allocated + self.reserved

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_memory is None else self.total <= self.gpu_memory

    def overrides(self) -> list[str]:
        """The train.* overrides that select this plan's settings."""
        flag = {True: "true", False: "false"}
        return [f"train.micro_batch_size={self.micro_batch_size}", f"train.grad_accum_steps={self.grad_accum_steps}",
                f"train.zero_stage={self.zero_stage}",
                f"train.activation_checkpointing={flag[self.activation_checkpointing]}",
                f"train.offload_optimizer={flag[self.offload_optimizer]}",
                f"train.offload_params={flag[self.offload_params]}"]


@dataclass(frozen=True)
class PlanResult:
    """`bigray plan`'s answer: the config as given, the proposal, and where the inputs came from."""

    model: str
    shape: ModelShape
    plan: MemoryPlan
    proposal: MemoryPlan | None
    notes: list[str]

    @property
    def verdict(self) -> str:
        """One line: whether the config fits, and what to change when it does not."""
        p, q = self.plan, self.proposal
        if p.fits is None:
            return f"needs {p.total / GIB:.1f} GiB per GPU; GPU memory unknown, so no verdict"
        if p.fits:
            return f"fits: {p.total / GIB:.1f} of {p.gpu_memory / GIB:.1f} GiB per GPU"
        fix = f"this fits: {' '.join(q.overrides())}" if q else "nothing fits at micro batch 1 even with every offload"
        return f"does not fit: needs {p.total / GIB:.1f} GiB per GPU, the GPUs have {p.gpu_memory / GIB:.1f}; {fix}"


def model_shape(model: ModelConfig, vocab_size: int, seq_len: int, store: Store | None = None) -> ModelShape:
    """Parameter counts by building the model on the meta device (no memory, any HF architecture)."""
    import json

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if model.pretrained:
        store = store or Store()
        raw = json.loads(store.read_text(join(model.pretrained, "config.json")))
        hf_cfg = AutoConfig.for_model(**raw)
    else:
        hf_cfg = model_config(model, vocab_size, seq_len, 0)
    with torch.device("meta"):
        built = AutoModelForCausalLM.from_config(hf_cfg)
    n_params = sum(p.numel() for p in built.parameters())
    layers = built.base_model.layers if hasattr(built.base_model, "layers") else None
    hidden, n_layers = hf_cfg.hidden_size, hf_cfg.num_hidden_layers
    heads = hf_cfg.num_attention_heads
    kv_heads = getattr(hf_cfg, "num_key_value_heads", None) or heads
    return ModelShape(
        n_params=n_params,
        layer_params=sum(p.numel() for p in layers[0].parameters()) if layers is not None else n_params // n_layers,
        embed_params=built.get_input_embeddings().weight.numel(),
        vocab_size=hf_cfg.vocab_size, hidden_size=hidden, num_layers=n_layers, kv_hidden=hidden * kv_heads // heads,
        intermediate_size=getattr(hf_cfg, "intermediate_size", 4 * hidden),
        flops_per_token=flops_per_token(hf_cfg, n_params, seq_len), seq_len=seq_len,
    )


def state_bytes(t: TrainConfig, shape: ModelShape, precision: str) -> tuple[float, float, float, float]:
    """(weights, gradients, optimizer) on the GPU and what offload keeps in CPU RAM, per rank."""
    n, d = shape.n_params, t.num_workers
    a = 4 if precision == "fp32" else 2
    g = _grad_bytes(t, precision)
    k = 8 if precision == "fp32" else 12
    weights = a * n / (d if t.zero_stage == 3 else 1)
    grads = g * n / (d if t.zero_stage >= 2 else 1)
    optimizer = k * n / (d if t.zero_stage >= 1 else 1)
    cpu = 0.0
    if t.offload_optimizer:
        cpu += optimizer + (grads if t.zero_stage >= 2 else 0.0)
        grads, optimizer = (0.0 if t.zero_stage >= 2 else grads), 0.0
    if t.offload_params:
        cpu, weights = cpu + weights, 0.0
    return weights, grads, optimizer, cpu


def layer_activation_bytes(shape: ModelShape, a: int, compiled: bool) -> float:
    """Bytes one decoder layer saves for backward, per token (module docstring)."""
    h, hkv, i = shape.hidden_size, shape.kv_hidden, shape.intermediate_size
    if compiled:
        return a * (7 * h + 2 * hkv + 3 * i)
    return 8 * h + a * (7 * h + 2 * hkv + 4 * i)


def activation_bytes(shape: ModelShape, tokens: int, a: int, checkpointing: bool,
                     compiled: bool) -> tuple[float, float]:
    """(saved for backward over all layers and the final norm, one layer's backward working set)."""
    h, i = shape.hidden_size, shape.intermediate_size
    layer = layer_activation_bytes(shape, a, compiled)
    saved = shape.num_layers * (a * h if checkpointing else layer) + 4 * h + 2 * a * h
    backward = a * (2 * h + 3 * i) + (layer if checkpointing else 0)
    return tokens * saved, tokens * backward


def loss_bytes(impl: str, tokens: int, vocab: int, hidden: int, a: int) -> float:
    """Peak bytes of the logits and the cross-entropy, forward and backward, by loss implementation."""
    if impl == "plain":
        return 12.0 * tokens * vocab
    chunk = chunk_tokens(tokens, vocab, hidden)
    if impl == "chunked":
        return 12.0 * chunk * vocab + 2 * a * vocab * hidden + 2 * a * tokens * hidden
    if impl == "liger":
        return 8.0 * chunk * vocab + a * tokens * hidden + 4 * vocab * hidden
    raise ValueError(f"unknown loss impl {impl!r}")


def bucket_bytes(t: TrainConfig, shape: ModelShape, precision: str, on_gpu: bool) -> float:
    """DeepSpeed's communication buckets and ZeRO-3's gathered parameters, as zero.py sizes them."""
    a = 4 if precision == "fp32" else 2
    zero = deepspeed_config(t, t.num_workers, precision, on_gpu)["zero_optimization"]
    out = 0.0
    if t.zero_stage >= 1:
        # DeepSpeed never allocates a bucket larger than the model.
        reduce = min(zero.get("reduce_bucket_size", 5e8), shape.n_params)
        out += reduce * _grad_bytes(t, precision) * (2 if zero.get("overlap_comm") else 1)
        out += min(zero.get("allgather_bucket_size", 5e8), shape.n_params) * a
    if t.zero_stage == 3:
        live = 2 * shape.layer_params + zero.get("stage3_prefetch_bucket_size", 5e7) + shape.embed_params
        out += min(live, zero.get("stage3_max_live_parameters", 1e9), shape.n_params) * a
    return out


def memory_plan(t: TrainConfig, shape: ModelShape, gpu_memory_gb: float | None = None, on_gpu: bool = True,
                mfu: float = ASSUMED_MFU, peak_tflops: float | None = None) -> MemoryPlan:
    """Bytes per GPU of `t` on `shape`; `gpu_memory_gb` (GiB) decides `fits`."""
    precision = "fp32" if not on_gpu and t.precision == "fp16" else t.precision
    a = 4 if precision == "fp32" else 2
    impl = resolve_loss_impl(t.loss_impl, "cuda", t.zero_stage) if t.loss_impl == "auto" and on_gpu else (
        "plain" if t.loss_impl == "auto" else t.loss_impl)
    tokens = t.micro_batch_size * shape.seq_len
    weights, grads, optimizer, cpu = state_bytes(t, shape, precision)
    saved, layer_backward = activation_bytes(shape, tokens, a, t.activation_checkpointing, t.compile)
    logits = loss_bytes(impl, tokens, shape.vocab_size, shape.hidden_size, a)
    dynamic = saved + max(logits, layer_backward)
    reserved = (CUDA_CONTEXT_GIB * GIB if on_gpu else 0.0) + FRAGMENTATION * dynamic
    return MemoryPlan(
        micro_batch_size=t.micro_batch_size, grad_accum_steps=t.grad_accum_steps, zero_stage=t.zero_stage,
        offload_optimizer=t.offload_optimizer, offload_params=t.offload_params,
        activation_checkpointing=t.activation_checkpointing, loss_impl=impl, precision=precision, world=t.num_workers,
        params=weights, grads=grads, optimizer=optimizer, activations=saved, layer_backward=layer_backward,
        logits=logits,
        buckets=bucket_bytes(t, shape, precision, on_gpu), reserved=reserved,
        cpu_offloaded=cpu, gpu_memory=gpu_memory_gb * GIB if gpu_memory_gb else None,
        tokens_per_s=expected_tokens_per_s(t, shape, impl, mfu, peak_tflops) if on_gpu else None, mfu=mfu,
    )


def expected_tokens_per_s(t: TrainConfig, shape: ModelShape, impl: str, mfu: float, peak_tflops: float | None) -> float:
    """Tokens/s per GPU at `mfu` of the dense peak, recompute (activation checkpointing, chunked loss) included."""
    peak = (peak_tflops or DEFAULT_PEAK_TFLOPS) * 1e12
    layer_params = shape.layer_params * shape.num_layers
    recompute = 0.0
    if t.activation_checkpointing:
        recompute += 2 * layer_params + 4 * shape.num_layers * shape.hidden_size * shape.seq_len
    if impl == "chunked":
        recompute += 2 * shape.vocab_size * shape.hidden_size
    return mfu * peak / (shape.flops_per_token + recompute)


def propose(t: TrainConfig, shape: ModelShape, gpu_memory_gb: float, mfu: float = ASSUMED_MFU,
            peak_tflops: float | None = None) -> MemoryPlan | None:
    """The cheapest settings that fit, with the largest micro batch that keeps the global batch; None if nothing fits.

    Settings are tried from the cheapest in throughput: as configured; higher ZeRO stages (sharding only helps
    with more than one rank: ZeRO-3 cost 6% on one H100 in README's runs); activation checkpointing (a third
    more FLOPs); optimizer offload; parameter offload (both bound by PCIe and the CPU).
    """
    rows = t.micro_batch_size * t.grad_accum_steps  # sequences per worker per optimizer step, kept as is
    for settings in _escalation(t):
        base = t.model_copy(update=settings)
        best = None
        for mb in _divisors(rows):
            candidate = memory_plan(base.model_copy(update={"micro_batch_size": mb, "grad_accum_steps": rows // mb}),
                                    shape, gpu_memory_gb, True, mfu, peak_tflops)
            if candidate.fits:
                best = candidate
        if best is not None:
            return best
    return None


def plan(cfg: Config, gpu_memory_gb: float | None = None, gpus: int | None = None,
         mfu: float = ASSUMED_MFU) -> PlanResult:
    """`bigray plan`: the per-GPU breakdown of the config and the proposal, before anything starts."""
    t = cfg.train
    if gpus:
        t = t.model_copy(update={"num_workers": gpus})
    vocab, seq_len, source = _vocab_and_seq_len(t, cfg.data, Store(cfg.storage))
    notes = [source]
    memory, where = gpu_memory(t, gpu_memory_gb)
    notes.append(where)
    peak_tflops = t.peak_tflops or _driver_peak_tflops()
    notes.append(f"throughput at an assumed MFU of {mfu:.0%} of {peak_tflops or DEFAULT_PEAK_TFLOPS:.0f} TFLOP/s"
                 + ("" if peak_tflops else " (H100 SXM bf16; set train.peak_tflops for another GPU)"))
    shape = model_shape(cfg.model, vocab, seq_len, Store(cfg.storage))
    as_given = memory_plan(t, shape, memory, t.use_gpu, mfu, peak_tflops)
    if not t.use_gpu:
        notes.append("train.use_gpu is false: the figures are for CPU workers (fp32 where bf16 is not supported)")
    proposal = propose(t, shape, memory, mfu, peak_tflops) if memory and t.use_gpu else None
    if proposal and (proposal.offload_optimizer or proposal.offload_params):
        notes.append("offload: the CPU Adam step and the PCIe copies are not in tokens/s; expect several times fewer")
    model = cfg.model.pretrained or f"preset {cfg.model.preset}"
    return PlanResult(model=model, shape=shape, plan=as_given, proposal=proposal, notes=notes)


def check_fits(t: TrainConfig, model: ModelConfig, vocab_size: int, seq_len: int, store: Store) -> MemoryPlan | None:
    """Refuse, before any worker starts, a GPU config the planner says cannot fit; None when the GPU size is unknown."""
    memory, _ = gpu_memory(t)
    if not t.use_gpu or memory is None:
        return None
    shape = model_shape(model, vocab_size, seq_len, store)
    need = memory_plan(t, shape, memory)
    if need.fits:
        return need
    proposal = propose(t, shape, memory)
    fix = (f"; this fits: {' '.join(proposal.overrides())} ({proposal.total / GIB:.1f} GiB)" if proposal else
           "; nothing fits, even ZeRO-3 with both offloads and activation checkpointing at micro batch 1: add GPUs")
    raise ConfigError(
        f"train: the config needs {need.total / GIB:.1f} GiB per GPU (weights {need.params / GIB:.1f}, grads "
        f"{need.grads / GIB:.1f}, optimizer {need.optimizer / GIB:.1f}, activations {need.activations / GIB:.1f}, "
        f"logits {need.logits / GIB:.1f}, ...) but the GPUs have {memory:.1f} GiB{fix}. "
        f"`bigray plan` with the same config and overrides shows the breakdown.")


def gpu_memory(t: TrainConfig, override_gb: float | None = None) -> tuple[float | None, str]:
    """GiB per GPU and where the figure came from: the argument, train.gpu_memory_gb, else the driver's GPU 0."""
    if override_gb:
        return override_gb, f"GPU memory {override_gb:g} GiB (--gpu-memory)"
    if t.gpu_memory_gb:
        return t.gpu_memory_gb, f"GPU memory {t.gpu_memory_gb:g} GiB (train.gpu_memory_gb)"
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.total_memory / GIB, f"GPU memory {props.total_memory / GIB:.1f} GiB ({props.name} on this machine)"
    return None, "GPU memory unknown (no GPU here): pass --gpu-memory or set train.gpu_memory_gb to check the fit"


def _grad_bytes(t: TrainConfig, precision: str) -> int:
    """Bytes per accumulated gradient: zero.py's fp32 accumulation for bf16 under ZeRO, unless train.deepspeed says."""
    if precision == "fp32":
        return 4
    accum = t.deepspeed.get("data_types", {}).get("grad_accum_dtype")
    if accum is None:
        accum = "fp32" if precision == "bf16" and t.zero_stage >= 1 else precision
    return 4 if accum in ("fp32", "float32") else 2


def _escalation(t: TrainConfig) -> list[dict]:
    """Settings from the cheapest to the most memory-frugal, starting at the config's own."""
    out = []
    stages = range(t.zero_stage, 4) if t.num_workers > 1 else [t.zero_stage]
    for ac in dict.fromkeys([t.activation_checkpointing, True]):
        for stage in stages:
            out.append({"zero_stage": stage, "activation_checkpointing": ac, "offload_optimizer": t.offload_optimizer,
                        "offload_params": t.offload_params and stage == 3})
    top = max(t.zero_stage, 1 if t.num_workers == 1 else 3)
    frugal = {"activation_checkpointing": True, "offload_optimizer": True}
    out.append({"zero_stage": top, **frugal, "offload_params": False})
    out.append({"zero_stage": 3, **frugal, "offload_params": True})
    return [dict(s) for s in dict.fromkeys(tuple(sorted(s.items())) for s in out)]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _vocab_and_seq_len(t: TrainConfig, data: DataConfig, store: Store) -> tuple[int, int, str]:
    """From the prepared data's manifest when there is one, else from data.vocab_size / data.seq_len."""
    import json

    manifest_uri = t.data or data.output
    if manifest_uri:
        path = manifest_uri if manifest_uri.endswith(".json") else join(manifest_uri, "manifest.json")
        if store.exists(path):
            manifest = json.loads(store.read_text(path))
            return (manifest["tokenizer"]["vocab_size"], manifest["seq_len"],
                    f"vocab {manifest['tokenizer']['vocab_size']} and seq_len {manifest['seq_len']} from {path}")
    vocab, seq_len = data.vocab_size, data.seq_len
    return vocab, seq_len, f"vocab {vocab} and seq_len {seq_len} from data.vocab_size and data.seq_len"


def _driver_peak_tflops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    peak = peak_flops(torch.cuda.get_device_name(0))
    return peak / 1e12 if peak else None

