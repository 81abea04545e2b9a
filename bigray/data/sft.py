"""SFT records: chat turns from the common record shapes, rendered with a chat template, with a target mask.

A record becomes a list of messages ({"role", "content"}):

- `messages` (field `data.messages_field`): OpenAI turns ({"role", "content"}) or ShareGPT turns
  ({"from", "value"}, roles human/gpt/system); roles system, user, assistant, tool;
- `prompt` / `completion`: one user turn, one assistant turn;
- `instruction` / `input` (optional) / `output`: one user turn (instruction, a blank line, input), one assistant turn.

The messages are rendered with a Jinja chat template (`data.chat_template`, else the tokenizer's, else
`DEFAULT_CHAT_TEMPLATE`, the one `bigray serve` falls back to) through transformers' own renderer. An assistant
turn's target text is what the template adds after the prompt a server would send: render(messages[:k],
add_generation_prompt=True) is a prefix of render(messages[:k + 1]), and the difference (trailing whitespace left
out) is the target. Each piece is tokenized on its own, so target and prompt never share a token and the prompt's
tokens are exactly what the server tokenizes before generating.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import numpy as np

# bigray's BPE has no chat template: one "<role>: <content>" line per turn, "assistant:" for the model to continue
# (what bigray serve sends), and EOS closing each assistant turn so a fine-tuned model learns to stop.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m.role }}: {{ m.content }}{{ eos_token if m.role == 'assistant' else '' }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool",
         "human": "user", "gpt": "assistant"}  # ShareGPT's names on the right


class BadRecord(Exception):
    """A record that cannot become a training document; `reason` is its drop counter's key."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ChatFormat:
    """How read tasks render SFT records: the template, where it came from, the tokens it names, what is trained."""

    template: str
    source: str  # "config", "tokenizer" or "bigray default"
    special_tokens: tuple[tuple[str, str], ...]  # (name, token) as the template sees them: eos_token, bos_token, ...
    train_on: str
    messages_field: str = "messages"


def chat_format(chat_template: str | None, tokenizer_template: str | None, special_tokens: dict[str, str],
                train_on: str, messages_field: str) -> ChatFormat:
    """The ChatFormat for `data.chat_template` (wins), else the tokenizer's template, else bigray's default."""
    if chat_template:
        template, source = chat_template, "config"
    elif tokenizer_template:
        template, source = tokenizer_template, "tokenizer"
    else:
        template, source = DEFAULT_CHAT_TEMPLATE, "bigray default"
    specials = tuple(sorted((k, v) for k, v in special_tokens.items() if isinstance(v, str)))
    return ChatFormat(template, source, specials, train_on, messages_field)


def _text(value, reason: str = "bad_message") -> str:
    if not isinstance(value, str):
        raise BadRecord(reason)
    return unicodedata.normalize("NFC", value)


def to_messages(record: dict, messages_field: str = "messages") -> list[dict]:
    """The record's turns as [{"role", "content"}] (NFC), or BadRecord naming what is wrong."""
    if not isinstance(record, dict):
        raise BadRecord("missing_field")
    if record.get(messages_field) is not None:
        turns = record[messages_field]
        if not isinstance(turns, list) or not turns:
            raise BadRecord("bad_message")
        messages = []
        for turn in turns:
            if not isinstance(turn, dict):
                raise BadRecord("bad_message")
            # Arrow structs hold the union of keys: a ShareGPT turn there may carry "role": None.
            openai = turn.get("role") is not None
            role, content = (turn.get("role"), turn.get("content")) if openai else (turn.get("from"), turn.get("value"))
            if role not in ROLES:
                raise BadRecord("unknown_role")
            messages.append({"role": ROLES[role], "content": _text(content)})
    elif record.get("prompt") is not None and record.get("completion") is not None:
        messages = [{"role": "user", "content": _text(record["prompt"])},
                    {"role": "assistant", "content": _text(record["completion"])}]
    elif record.get("instruction") is not None and record.get("output") is not None:
        prompt = _text(record["instruction"])
        if record.get("input"):
            prompt += "\n\n" + _text(record["input"])
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(record["output"])}]
    else:
        raise BadRecord("missing_field")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("no_assistant_turn")
    return messages


def render_text(messages: list[dict], fmt: ChatFormat, add_generation_prompt: bool = False) -> str:
    """The template applied to `messages` (transformers' renderer, as `apply_chat_template(tokenize=False)`)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        rendered, _ = render_jinja_template(conversations=[messages], chat_template=fmt.template,
                                            add_generation_prompt=add_generation_prompt, **dict(fmt.special_tokens))
    except Exception:  # noqa: BLE001 - a template that rejects a record (raise_exception, a role it lacks) drops it
        raise BadRecord("template_error") from None
    return rendered[0]


def render(messages: list[dict], fmt: ChatFormat) -> tuple[tuple[str, bool], ...]:
    """The rendered conversation cut into (text, is_target) pieces whose texts concatenate to the whole rendering."""
    full = render_text(messages, fmt)
    if fmt.train_on == "all":
        return ((full, True),)
    pieces, done = [], 0
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, turn = render_text(messages[:k], fmt, add_generation_prompt=True), render_text(messages[: k + 1], fmt)
        if not (turn.startswith(prompt) and full.startswith(turn)) or len(prompt) < done:
            # The template renders history differently from a prompt (e.g. drops earlier reasoning): no clean cut.
            raise BadRecord("template_mismatch")
        end = max(len(prompt), len(turn.rstrip()))
        if prompt[done:]:
            pieces.append((prompt[done:], False))
        if end > len(prompt):
            pieces.append((turn[len(prompt): end], True))
        done = end
    if full[done:]:
        pieces.append((full[done:], False))
    if not any(target for _, target in pieces):
        raise BadRecord("no_assistant_turn")
    return tuple(pieces)


def encode_pieces(pieces: list[tuple[tuple[str, bool], ...]], tok) -> list[tuple[list[int], np.ndarray]]:
    """(ids, mask) per document, its pieces tokenized one by one (no special tokens added) by the Rust tokenizer."""
    flat = [text for doc in pieces for text, _ in doc]
    encodings = tok.encode_batch_fast(flat, add_special_tokens=False) if flat else []
    out, i = [], 0
    for doc in pieces:
        ids, mask = [], []
        for _, target in doc:
            piece = encodings[i].ids
            ids.extend(piece)
            mask.extend([int(target)] * len(piece))
            i += 1
        out.append((ids, np.array(mask, dtype=np.uint8)))
    return out


def truncate(ids: list[int], mask: np.ndarray, max_len: int, policy: str) -> tuple[list[int], np.ndarray]:
    """Fit a document into `max_len` tokens by `data.truncate`; BadRecord("too_long") when dropped or left
    with no target (a target must be a token after the document's first: the first has nothing to predict it)."""
    if len(ids) > max_len:
        if policy == "drop":
            raise BadRecord("too_long")
        cut = slice(len(ids) - max_len, None) if policy == "left" else slice(0, max_len)
        ids, mask = ids[cut], mask[cut]
    if not mask[1:].any():
        raise BadRecord("too_long" if len(mask) == max_len else "no_assistant_turn")
    return ids, mask
