"""One typed config tree for every bigray command.

Sources, lowest precedence first: the defaults below, each `-c FILE` in order, then dotted
overrides such as `train.lr=3e-4` (values parsed as YAML). Validation happens once, here, before
any Ray work starts; errors name the key and the file (or "command line") that set it.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bigray.errors import ConfigError


class Section(BaseModel):
    # Unknown keys are typos until proven otherwise; assignment is validated too so code that
    # edits a config (tune trials, the demo) cannot build an invalid one.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RayConfig(Section):
    address: str | None = Field(
        None, description='null: start a local cluster on 127.0.0.1; "auto" or ray://host:10001'
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local cluster (null: all of this machine's)")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] | None = Field(
        None,
        description="console level of Ray's own loggers (Train, Data, Serve); null: WARNING on a local cluster, "
        "INFO on a cluster you connect to. Ray's log files keep everything either way",
    )


class StorageConfig(Section):
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint; null: AWS_ENDPOINT_URL or real S3")
    region: str | None = Field(None, description="S3 region; null: AWS_DEFAULT_REGION / AWS_REGION or us-east-1")


class DataConfig(Section):
    inputs: list[str] = Field(
        default_factory=list, description="local paths, globs or s3:// URIs; {stdlib} is Python's standard library dir"
    )
    exclude: list[str] = Field(
        default_factory=list, description="glob patterns (fnmatch on the full path) of files to skip"
    )
    format: Literal["auto", "jsonl", "parquet", "text"] = Field(
        "auto", description="auto picks by extension: .jsonl/.json, .parquet, anything else is text"
    )
    text_field: str = Field("text", description="jsonl/parquet field holding the document")
    output: str | None = Field(None, description="local dir or s3:// prefix for shards and manifest.json")
    tokenizer: str | None = Field(
        None, description="HF tokenizer dir (local or s3://); null: prepare trains one beside the shards"
    )
    vocab_size: int = Field(8192, ge=256, le=1 << 20, description="vocab size when bigray trains the tokenizer")
    tokenizer_sample_mb: float = Field(
        64.0, gt=0, description="MB of input text the tokenizer is trained on (a seeded sample)"
    )
    seq_len: int = Field(1024, ge=1, description="tokens per training sequence; rows hold seq_len + 1 ids")
    val_fraction: float = Field(0.01, ge=0.0, lt=1.0, description="fraction of documents assigned to the val split")
    min_chars: int = Field(1, ge=0, description="drop documents shorter than this (after NFC)")
    dedup: Literal["exact", "minhash", "none"] = Field(
        "exact",
        description="exact: drop repeated documents (content hash); minhash: also near-duplicates; "
        "true/false mean exact/none",
    )
    minhash_ngram: int = Field(5, ge=1, description="minhash: tokens per shingle")
    minhash_permutations: int = Field(128, ge=8, le=1024, description="minhash: signature length (hash permutations)")
    minhash_threshold: float = Field(
        0.8, gt=0, lt=1, description="minhash: Jaccard similarity above which documents are near-duplicates"
    )
    partitions: int = Field(
        16,
        ge=1,
        description="hash partitions that dedup, split, pack and write in parallel; fixed so output never "
        "depends on the cluster; each drops at most one partial row per split",
    )
    block_rows: int | None = Field(
        None, ge=1, description="rows per parquet row group, the unit a reader fetches; null: ~4 MB of tokens"
    )
    seed: int = Field(0, ge=0, description="seeds the train/val split and the tokenizer sample")
    shard_mb: float = Field(64.0, gt=0, description="target size of one parquet shard")
    on_bad_record: Literal["drop", "error"] = Field(
        "drop", description="bad JSON / missing field / invalid UTF-8: count and drop, or fail"
    )
    docs_per_task: int = Field(256, ge=1, description="documents per encode batch in a read task (no effect on output)")
    task: Literal["pretrain", "sft"] = Field(
        "pretrain",
        description="pretrain: documents from data.text_field, EOS-joined streams; sft: chat records (messages, "
        "prompt/completion or instruction/input/output) rendered with a chat template, packed whole with loss_mask",
    )
    messages_field: str = Field(
        "messages", description="sft: record field holding the turns (OpenAI role/content or ShareGPT from/value)"
    )
    chat_template: str | None = Field(
        None,
        description="sft: Jinja chat template; null: the tokenizer's own, else bigray's default (the one bigray "
        "serve uses); the template used is saved in <output>/tokenizer",
    )
    train_on: Literal["assistant", "all"] = Field(
        "assistant", description="sft: tokens that are training targets: the assistant turns only, or all"
    )
    truncate: Literal["drop", "left", "right"] = Field(
        "drop",
        description="sft: a record longer than seq_len + 1 tokens is dropped, or cut on the left (keeps the end) "
        "or on the right",
    )
    pack_boundaries: bool = Field(
        False,
        description="pretrain: also write segment_ids (document index within each row) for per-document attention",
    )

    @model_validator(mode="after")
    def _consistent_data(self) -> DataConfig:
        if self.task == "sft" and self.format == "text":
            raise ValueError("task sft reads records (jsonl, parquet or a datasets dir), not format text")
        if self.task == "sft" and self.dedup == "minhash":
            raise ValueError("dedup minhash is for pretraining text; use dedup exact (or none) with task sft")
        return self

    @field_validator("dedup", mode="before")
    @classmethod
    def _dedup_bool(cls, value: Any) -> Any:
        # Configs written before minhash existed say dedup: true/false.
        return {True: "exact", False: "none"}.get(value, value) if isinstance(value, bool) else value


class ModelConfig(Section):
    preset: Literal["tiny", "125m", "350m", "1b", "8b"] = Field(
        "tiny", description="Llama-architecture shape, random init"
    )
    pretrained: str | None = Field(None, description="local or s3:// HF model dir; overrides preset")
    attention: Literal["auto", "sdpa", "flash_attention_2", "eager"] = Field(
        "auto",
        description="attention kernel; auto: flash_attention_2 on CUDA in bf16/fp16 when flash-attn is installed "
        "(packed documents padding-free, varlen), else sdpa (packed documents through a block-diagonal mask)",
    )


class LoraConfig(Section):
    r: int = Field(8, ge=1, description="rank of each adapter's A (r x in) and B (out x r) matrices")
    alpha: float = Field(16.0, gt=0, description="scaling: the adapter's update is multiplied by alpha / r")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapter's input while training")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description='module names (suffixes, as peft matches them) that get an adapter, e.g. [q_proj, v_proj]; '
        '"all-linear": every linear layer except the output head',
    )
    export: Literal["merged", "adapter"] = Field(
        "merged",
        description="what the export at the end of a run writes: the merged HF model, or the peft adapter dir "
        "(served on its base, model.pretrained)",
    )

    @field_validator("target_modules")
    @classmethod
    def _some_targets(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError('name at least one module, or "all-linear"')
        return value


class TrainConfig(Section):
    data: str | None = Field(None, description="manifest URI (dir or manifest.json); null: data.output")
    num_workers: int = Field(2, ge=1, description="Ray Train workers (one DeepSpeed rank each)")
    use_gpu: bool = Field(False, description="one GPU per worker")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage")
    offload_optimizer: bool = Field(False, description="ZeRO optimizer state on CPU")
    offload_params: bool = Field(False, description="ZeRO-3 parameters on CPU")
    precision: Literal["bf16", "fp16", "fp32"] = Field(
        "bf16", description="fp32 is forced where the device lacks the others"
    )
    micro_batch_size: int = Field(4, ge=1, description="sequences per worker per micro step")
    grad_accum_steps: int = Field(1, ge=1, description="micro steps per optimizer step")
    lr: float = Field(3.0e-4, gt=0, description="peak learning rate")
    min_lr: float = Field(3.0e-5, ge=0, description="learning rate at the end of cosine decay")
    warmup_steps: int = Field(100, ge=0, description="linear warmup steps")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (not on norms and biases)")
    grad_clip: float = Field(1.0, ge=0, description="global grad-norm clip; 0 disables")
    max_steps: int = Field(1000, ge=1, description="optimizer steps")
    eval_every: int = Field(100, ge=1, description="steps between validation passes")
    log_every: int = Field(10, ge=1, description="steps between metric reports")
    checkpoint_every: int = Field(200, ge=1, description="steps between checkpoints")
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept")
    checkpoint_upload: Literal["async", "sync"] = Field(
        "async", description="async: training steps on while Ray Train uploads a checkpoint; sync: it waits"
    )
    checkpoint_write: Literal["inline", "background"] = Field(
        "inline",
        description="inline: the step waits while a checkpoint's files are written; background: a thread writes "
        "them from a host copy and the checkpoint goes with a later report (its step in metrics checkpoint_step)",
    )
    max_failures: int = Field(3, ge=0, description="worker-group restarts Ray Train attempts")
    storage_path: str | None = Field(None, description="local dir or s3:// prefix for runs")
    run_name: str | None = Field(None, description="null: generated")
    seed: int = Field(0, ge=0, description="model init and data order")
    eval_batches: int | None = Field(
        None, ge=1, description="global val batches per evaluation; null: the whole val split"
    )
    shuffle_blocks: int = Field(
        4, ge=1, description="blocks per shuffle window: each partition permutes the rows of this many blocks (seeded)"
    )
    data_partitions: int | None = Field(
        None,
        ge=1,
        description="canonical partitions of the train split (num_workers must divide it; fixed across resumes); "
        "null: the largest of 240, 120, 60, 48, 24, 16, 12, 8, 4, 2, 1 giving each partition >= 4 blocks",
    )
    activation_checkpointing: bool = Field(False, description="recompute activations in backward to save memory")
    compile: bool = Field(False, description="torch.compile the model")
    loss_impl: Literal["auto", "plain", "chunked", "liger"] = Field(
        "auto",
        description="cross-entropy: full logits (plain), chunked lm_head + CE, liger's fused kernel; "
        "auto: liger (else chunked) on GPU, plain on CPU (bigray/train/loss.py)",
    )
    gpu_memory_gb: float | None = Field(
        None,
        gt=0,
        description="GiB per GPU for the planner's fit check before workers start; null: the driver's GPU, else none",
    )
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per Ray Train worker")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="extra Ray resources per worker, e.g. {accelerator_type:H100: 0.01}"
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement of the workers"
    )
    peak_tflops: float | None = Field(
        None, gt=0, description="device dense peak for MFU; null: from the table by device name"
    )
    export: bool = Field(True, description="consolidate the final checkpoint into <run>/export/ (HF dir)")
    lora: LoraConfig | None = Field(
        None,
        description="LoRA adapters (peft) on model.pretrained, the only weights that train; null: full fine-tuning",
    )
    deepspeed: dict[str, Any] = Field(default_factory=dict, description="raw DeepSpeed config merged last")

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(
                f"offload_params needs zero_stage 3 (got zero_stage {self.zero_stage}); "
                "ZeRO shards parameters only in stage 3"
            )
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage >= 1")
        if self.data_partitions is not None and self.data_partitions % self.num_workers:
            raise ValueError(
                f"data_partitions ({self.data_partitions}) must be a multiple of num_workers ({self.num_workers}): "
                "each worker reads whole partitions"
            )
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError("precision fp16 needs use_gpu=true (CPUs have no fp16 math); use bf16 or fp32 on CPU")
        return self


class TuneConfig(Section):
    search_space: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description='{"train.lr": {loguniform: [1e-4, 3e-3]}}; PBT: optimizer scalars only'
    )
    num_samples: int = Field(8, ge=1, description="trials")
    max_concurrent: int = Field(2, ge=1, description="trials running at once (capped by what the cluster fits)")
    scheduler: Literal["asha", "fifo", "pbt"] = Field("asha", description="trial scheduler")
    metric: str = Field("val_loss", description="metric the scheduler and the best trial use")
    mode: Literal["min", "max"] = Field("min", description="minimise or maximise the metric")
    storage_path: str | None = Field(None, description="local dir or s3:// prefix for sweeps")
    name: str | None = Field(None, description="null: generated")
    searcher: Literal["random", "optuna"] = Field(
        "random", description="random/grid variants, or Optuna's TPE (needs the `tune` extra)"
    )
    grace_period: int = Field(
        100, ge=1, description="ASHA: steps every trial runs before it can be stopped; rungs must fall on checkpoints"
    )
    reduction_factor: float = Field(2.0, gt=1, description="ASHA: 1/reduction_factor of the trials go on at each rung")
    perturbation_interval: int | None = Field(
        None, ge=1, description="PBT: steps between exploit/explore; null: train.checkpoint_every"
    )
    quantile_fraction: float = Field(
        0.25, gt=0, le=0.5, description="PBT: bottom fraction that copies the top fraction"
    )
    resample_probability: float = Field(
        0.25, ge=0, le=1, description="PBT: chance a mutated value is resampled rather than perturbed"
    )
    seed: int | None = Field(None, description="seeds the searcher's sampling; null: random")
    max_failures: int = Field(
        1, ge=0, description="times Tune retries a failed trial from its last checkpoint, after Train's restarts"
    )


class AutoscalingConfig(Section):
    min_replicas: int = Field(1, ge=0, description="replicas kept when idle (0 scales to zero)")
    max_replicas: int = Field(1, ge=1, description="upper bound on replicas")
    target_ongoing_requests: float | None = Field(
        None, gt=0, description="in-flight requests per replica Serve scales towards; null: serve.max_batch_size"
    )


class ServeConfig(Section):
    model: str | None = Field(None, description="HF model dir (bigray export output), local or s3://")
    host: str = Field("127.0.0.1", description="HTTP bind address")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port")
    num_replicas: int = Field(1, ge=1, description="fixed replica count (ignored with autoscaling)")
    autoscaling: AutoscalingConfig | None = Field(None, description="Serve autoscaling; null: num_replicas")
    max_batch_size: int = Field(16, ge=1, description="requests batched together")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="how long a batch waits to fill")
    api_key: str | None = Field(
        None,
        description='when set, requests need "Authorization: Bearer <key>"; "${NAME}" / "env:NAME": from the env',
    )
    engine: Literal["hf", "vllm"] = Field(
        "hf", description="hf: bigray's batched HF engine (CPU or GPU); vllm: ray.serve.llm on GPU clusters"
    )
    model_name: str | None = Field(
        None, description="id clients pass as `model`; null: the model dir's name (its parent's for .../export)"
    )
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica (also torch's intra-op threads)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs (or a fraction) per replica; > 0 runs the model on CUDA")
    max_ongoing_requests: int = Field(
        64, ge=1, description="requests one replica holds at once (Serve's limit); keep >= max_batch_size"
    )
    max_queued_requests: int = Field(
        128, ge=-1, description="requests waiting for a replica before Serve answers 503; -1: unlimited"
    )
    max_n: int = Field(16, ge=1, description="most sequences one request may ask for: prompts in its list times `n`")
    max_body_bytes: int = Field(
        1 << 20, ge=1024, description="largest request body; bigger ones get 413 before they are parsed"
    )
    max_waiting: int = Field(
        256, ge=1, description="sequences queued in a replica's engine before new requests get 503 + Retry-After"
    )
    request_timeout_s: float | None = Field(
        600.0, gt=0, description="a request still generating after this gets 504 (its rows freed); null: none"
    )
    kv_token_budget: int | None = Field(
        None,
        ge=1,
        description="KV-cache tokens a replica admits (sum of prompt + max_tokens per sequence); null: batch x context",
    )
    prefill_chunk_tokens: int = Field(
        512,
        ge=16,
        description="prompt tokens (rows x columns) prefilled per engine step, so long prompts never stall streams",
    )
    step_timeout_s: float = Field(
        120.0,
        gt=0,
        description="an engine step running longer than this fails the health check (Serve replaces the replica)",
    )
    max_consecutive_failures: int = Field(
        3, ge=1, description="engine steps failing in a row before the health check fails"
    )
    health_check_period_s: float = Field(
        10.0, gt=0, description="how often Serve runs a replica's health check (3 failures in a row replace it)"
    )
    health_check_timeout_s: float = Field(
        30.0, gt=0, description="a health check taking longer than this counts as failed"
    )
    access_log: bool = Field(
        False, description="hf engine: Serve logs one access line per request (off: less work per request)"
    )
    ingress: Literal["proxy", "haproxy"] = Field(
        "proxy",
        description="proxy: Serve's Python proxy on port; haproxy: Serve's HAProxy there, sending HTTP straight to "
        "the replicas (RAY_SERVE_ENABLE_HA_PROXY; only for a Ray that bigray starts; opens ports on all interfaces)",
    )
    niceness: int | None = Field(
        0,
        ge=0,
        le=19,
        description="hf engine: how much nicer than Ray's own processes the replicas run (RAY_worker_niceness; in a "
        "Ray that bigray starts also Serve's proxy and controller): 0, the same priority; null: Ray's default, 15",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: float32 on CPU, bfloat16 on GPU"
    )
    accelerator_type: str | None = Field(
        None, description="vllm engine: Ray accelerator type per replica, e.g. A10G, H100"
    )
    vllm: dict[str, Any] = Field(
        default_factory=dict,
        description="vllm engine: raw LLMConfig fields merged last (engine_kwargs, runtime_env, ...)",
    )

    @model_validator(mode="after")
    def _consistent_serve(self) -> ServeConfig:
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                f"({self.max_batch_size}) or batches never fill"
            )
        if self.autoscaling and self.autoscaling.min_replicas > self.autoscaling.max_replicas:
            raise ValueError(
                f"autoscaling.min_replicas ({self.autoscaling.min_replicas}) exceeds max_replicas "
                f"({self.autoscaling.max_replicas})"
            )
        return self


class Config(Section):
    ray: RayConfig = Field(default_factory=RayConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)


def _merge(base: dict, update: dict, origin: dict[str, str], source: str, prefix: str = "") -> None:
    """Deep-merge `update` into `base`, recording which source set each leaf."""
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        # A search-space entry is one distribution: a later source replaces it instead of adding a second.
        if isinstance(value, dict) and isinstance(base.get(key), dict) and prefix != "tune.search_space.":
            _merge(base[key], value, origin, source, dotted + ".")
        else:
            base[key] = value
            origin[dotted] = source


def deep_merge(base: dict, update: dict) -> dict:
    """A new dict: `update` merged into `base`, nested dicts merged key by key, anything else replaced."""
    out = dict(base)
    for key, value in update.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def apply_overrides(cfg: Config, params: dict[str, Any], source: str = "overrides") -> Config:
    """`cfg` with dotted keys set (`{"train.lr": 1e-3}`), validated; errors name the key and `source`."""
    raw = cfg.model_dump(mode="json")
    origin: dict[str, str] = {}
    for key, value in params.items():
        nested = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        _merge(raw, nested, origin, source)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"invalid {source}:\n  " + "\n  ".join(_describe(e, origin) for e in exc.errors())) from None


def parse_override(item: str) -> dict:
    """`train.lr=3e-4` -> {"train": {"lr": 3e-4}}; the value is parsed as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"command line: bad override {item!r}; expected section.key=value (e.g. train.lr=3e-4)")
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"command line: {key}: value {raw!r} is not valid YAML ({exc})") from None
    out: dict = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def _describe(err: dict, origin: dict[str, str]) -> str:
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc)
    source = next(
        (origin[".".join(loc[:i])] for i in range(len(loc), 0, -1) if ".".join(loc[:i]) in origin), "defaults"
    )
    if err["type"] == "extra_forbidden":
        section = _section_of(loc[:-1])
        known = list(section.model_fields) if section else []
        close = difflib.get_close_matches(loc[-1], known, n=1)
        hint = f" (did you mean {'.'.join(loc[:-1] + close)}?)" if close else f"; known keys: {', '.join(known)}"
        return f"{source}: unknown key {key}{hint}"
    got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
    return f"{source}: {key or 'config'}: {err['msg']}{got}"


def _section_of(loc: list[str]) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(part)
        ann = field.annotation if field else None
        ann = next(
            (a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)), None
        )
        if ann is None:
            return None
        model = ann
    return model


def load_config(files: list[str | Path] = (), overrides: list[str] = ()) -> Config:
    """Merge YAML files and dotted overrides over the defaults and validate the result."""
    raw: dict = {}
    origin: dict[str, str] = {}
    for path in files:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections (data:, train:, ...)")
        _merge(raw, data, origin, str(path))
    for item in overrides:
        _merge(raw, parse_override(item), origin, "command line")
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(e, origin) for e in exc.errors()]
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from None


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML that `load_config` reads back unchanged."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def require(value: Any, key: str, command: str) -> Any:
    """Fail with a message naming `key` when a command needs a value the config left null."""
    if value is None or value == []:
        raise ConfigError(f"{key} is required by `bigray {command}`: set it in a config file or pass {key}=...")
    return value
