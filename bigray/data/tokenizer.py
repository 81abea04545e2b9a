"""`bigray tokenizer train`: a byte-level BPE with HF `tokenizers`; loading an existing HF tokenizer dir."""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from bigray.config import Config, DataConfig, require
from bigray.data.pack import unit_draw
from bigray.data.read import InputFile, content_hash, documents, read_groups, resolve_inputs
from bigray.data.sft import ChatFormat, chat_format
from bigray.errors import DataError
from bigray.runtime import init_ray
from bigray.storage import Store, is_remote, join

EOS = "<|endoftext|>"


@dataclass(frozen=True)
class TokenizerInfo:
    """What the workers and the manifest need: the fast tokenizer as JSON, and its facts."""

    uri: str
    json: str
    local_dir: str
    vocab_size: int
    eos_id: int
    sha256: str
    chat_template: str | None = None  # the dir's own template, if it has one
    special_tokens: tuple[tuple[str, str], ...] = ()  # (name, token): eos_token, bos_token, ... as templates see them


def train_tokenizer(cfg: Config) -> TokenizerInfo:
    """`bigray tokenizer train`: fit a BPE on a seeded sample of `data.inputs`, save it at `data.tokenizer`."""
    out_uri = require(cfg.data.tokenizer, "data.tokenizer", "tokenizer train")
    store = Store(cfg.storage)
    files = resolve_inputs(cfg.data, store)
    init_ray(cfg.ray)
    fit_tokenizer(cfg.data, store, out_uri, files, sample_format(cfg.data))
    return load_tokenizer(out_uri, store)


def sample_format(data: DataConfig) -> ChatFormat | None:
    """How SFT records are rendered for the BPE's training sample: bigray's BPE has no template of its own."""
    if data.task != "sft":
        return None
    return chat_format(data.chat_template, None, {"eos_token": EOS, "bos_token": EOS, "pad_token": EOS},
                       data.train_on, data.messages_field)


def fit_tokenizer(data: DataConfig, store: Store, out_uri: str, files: list[InputFile],
                  fmt: ChatFormat | None = None) -> str:
    """Train a byte-level BPE on a seeded `data.tokenizer_sample_mb` sample of `files`; returns `out_uri`.

    Read tasks draw the sample and one task trains on it and saves it: no text passes through the driver.
    SFT records (`fmt`) are sampled as rendered by their chat template.
    """
    import ray

    total = sum(f.size for f in files) or 1
    rate = min(1.0, data.tokenizer_sample_mb * (1 << 20) / total)
    files_ref = ray.put(files)
    sample = ray.remote(sample_task)
    samples = [sample.remote(files_ref, g, data, store, rate, fmt) for g in read_groups(files)]
    return ray.get(ray.remote(fit_task).remote(data.vocab_size, store, out_uri, *samples))


def sample_task(files: list[InputFile], indices: list[int], data: DataConfig, store: Store, rate: float,
                fmt: ChatFormat | None = None) -> list[str]:
    """Ray task: the documents of `files[indices]` drawn into the tokenizer sample (seeded by content)."""
    out, texts = [], []
    for _, doc, _, reason in itertools.chain(documents(files, indices, data, store, fmt), [(0, None, "", "end")]):
        if reason is None:
            texts.append(doc if fmt is None else "".join(text for text, _ in doc))
        if texts and (len(texts) >= data.docs_per_task or reason == "end"):
            draws = unit_draw(np.array([content_hash(t) for t in texts], dtype=np.uint64), data.seed + 1)
            out.extend(t for t, d in zip(texts, draws) if d < rate)
            texts = []
    return out


def fit_task(vocab_size: int, store: Store, out_uri: str, *samples: list[str]) -> str:
    """Ray task: train the BPE on the drawn samples (in input order) and save it at `out_uri`."""
    save_dir(lambda d: train_bpe(itertools.chain.from_iterable(samples), vocab_size, d), out_uri, store)
    return out_uri


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str) -> None:
    """Byte-level BPE (GPT-2 style: any byte sequence encodes, no unknown token), saved as an HF dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS)
    hf.save_pretrained(out_dir)
    # transformers 5 writes its own backend class name; the generic fast class loads in 4.x and 5.x.
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path) as f:
        tok_cfg = json.load(f)
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(cfg_path, "w") as f:
        json.dump(tok_cfg, f, indent=2)


def load_tokenizer(uri: str, store: Store) -> TokenizerInfo:
    """Load an HF tokenizer dir (local or s3://) offline; it must be a fast tokenizer with an EOS token."""
    from transformers import AutoTokenizer

    if not store.exists(uri):
        raise DataError(f"data.tokenizer: {uri} does not exist; train one with `bigray tokenizer train` "
                        "or set data.tokenizer=null")
    if is_remote(uri):
        local = tempfile.mkdtemp(prefix="bigray-tok-")
        copy_tokenizer(uri, local, store)  # not the weights of a model dir the tokenizer lives in
    else:
        local = store.filesystem(uri)[1]
    try:
        tok = AutoTokenizer.from_pretrained(local, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise DataError(f"data.tokenizer: {uri} is not a loadable HF tokenizer dir ({exc})") from None
    if not getattr(tok, "is_fast", False):
        raise DataError(f"data.tokenizer: {uri} has no fast (tokenizers) backend; add a tokenizer.json")
    if tok.eos_token_id is None:
        raise DataError(f"data.tokenizer: {uri} defines no eos_token; documents are joined with EOS")
    text = tok.backend_tokenizer.to_str()
    template = tok.chat_template
    if isinstance(template, dict):  # a dir with several named templates: "default" is the one apply_chat_template uses
        template = template.get("default")
    specials = tuple(sorted((k, v) for k, v in tok.special_tokens_map.items() if isinstance(v, str)))
    return TokenizerInfo(uri, text, local, len(tok), tok.eos_token_id, hashlib.sha256(text.encode()).hexdigest(),
                         template, specials)


# A tokenizer often lives in a model dir (data.tokenizer = model.pretrained): its weights and config must not
# travel with it, or an 8b dir is copied into the shards and the export ships the base model's weights.
MODEL_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt", ".onnx", ".index.json")
MODEL_FILES = frozenset({"config.json", "generation_config.json"})


def is_tokenizer_file(name: str) -> bool:
    return name not in MODEL_FILES and not name.endswith(MODEL_SUFFIXES)


def copy_tokenizer(src: str, dst: str, store: Store) -> None:
    """Copy the files of the tokenizer dir `src` to `dst` (local or s3://), leaving any model files beside them."""
    import pyarrow.fs as pafs

    fs, path = store.filesystem(src)
    for info in fs.get_file_info(pafs.FileSelector(path)):
        if info.type == pafs.FileType.File and is_tokenizer_file(info.base_name):
            store.write_bytes(join(dst, info.base_name), store.read_bytes(join(src, info.base_name)))


def save_chat_template(uri: str, template: str, store: Store) -> None:
    """Make `template` the chat template of the tokenizer dir at `uri` (what AutoTokenizer and bigray serve load)."""
    cfg_uri = join(uri, "tokenizer_config.json")
    cfg = json.loads(store.read_text(cfg_uri))
    cfg["chat_template"] = template
    store.write_text(cfg_uri, json.dumps(cfg, indent=2))
    # transformers prefers chat_template.jinja over the config's key when both exist: keep them equal.
    store.write_text(join(uri, "chat_template.jinja"), template)


@functools.lru_cache(maxsize=2)
def backend(tokenizer_json: str):
    """The Rust tokenizer, built once per worker process and reused for every batch."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json)


def save_dir(train_fn, out_uri: str, store: Store) -> None:
    """Run `train_fn(local_dir)` and put the result at `out_uri` (local or s3://)."""
    if not is_remote(out_uri):
        local = store.filesystem(out_uri)[1]
        os.makedirs(local, exist_ok=True)
        train_fn(local)
        return
    with tempfile.TemporaryDirectory(prefix="bigray-tok-") as tmp:
        train_fn(tmp)
        store.copy_dir(tmp, out_uri)
