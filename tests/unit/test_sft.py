"""SFT records: each record shape rendered by a chat template, with targets exactly on the assistant turns.

The reference for every mask is transformers itself: `apply_chat_template` of the prompt a server would send
(add_generation_prompt=True), tokenized by the HF tokenizer, must be exactly the masked (0) prefix.
"""

from __future__ import annotations

import numpy as np
import pytest

from bigray.data.sft import (
    DEFAULT_CHAT_TEMPLATE,
    BadRecord,
    chat_format,
    encode_pieces,
    render,
    to_messages,
    truncate,
)
from bigray.data.tokenizer import EOS, train_bpe

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = {"eos_token": EOS, "bos_token": EOS, "pad_token": EOS}


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    """bigray's own BPE, trained here on a few chat-like lines, loaded by transformers."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tok")
    lines = ["user: what is ray\nassistant: a framework for scaling python", "system: be brief",
             "<|im_start|>user\nhello<|im_end|>"] * 20
    train_bpe(lines, 300, str(d))
    return AutoTokenizer.from_pretrained(str(d), local_files_only=True)


def ids_and_mask(record, tok, template=None, train_on="assistant", field="messages"):
    fmt = chat_format(template, None, SPECIALS, train_on, field)
    messages = to_messages(record, field)
    (ids, mask), = encode_pieces([render(messages, fmt)], tok.backend_tokenizer)
    return messages, fmt, np.array(ids), mask


def hf_ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


RECORDS = {
    "openai": ({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is ray"},
                             {"role": "assistant", "content": "a framework"}]}, "messages"),
    "sharegpt": ({"conversations": [{"from": "human", "value": "what is ray"},
                                    {"from": "gpt", "value": "a framework"}]}, "conversations"),
    "prompt_completion": ({"prompt": "what is ray", "completion": "a framework"}, "messages"),
    "instruction": ({"instruction": "what is", "input": "ray", "output": "a framework"}, "messages"),
}


@pytest.mark.parametrize("shape", sorted(RECORDS))
@pytest.mark.parametrize("template", [None, CHATML], ids=["bigray-default", "chatml"])
def test_targets_are_exactly_the_assistant_reply(hf_tok, shape, template):
    record, field = RECORDS[shape]
    messages, fmt, ids, mask = ids_and_mask(record, hf_tok, template, field=field)
    assert messages[-1] == {"role": "assistant", "content": "a framework"}
    prompt = hf_tok.apply_chat_template(messages[:-1], chat_template=fmt.template, add_generation_prompt=True,
                                        tokenize=False)
    whole = hf_tok.apply_chat_template(messages, chat_template=fmt.template, tokenize=False)
    n = len(hf_ids(hf_tok, prompt))
    reply = " a framework" + EOS if template is None else "a framework<|im_end|>"
    target = hf_ids(hf_tok, reply)
    # Prompt tokens are the server's prompt tokens, then the reply, then the template's trailing newline (mask 0).
    np.testing.assert_array_equal(ids[:n], hf_ids(hf_tok, prompt))
    np.testing.assert_array_equal(ids[n: n + len(target)], target)
    assert hf_tok.decode(ids) == whole
    np.testing.assert_array_equal(mask, [0] * n + [1] * len(target) + [0] * (len(ids) - n - len(target)))
    assert hf_tok.decode(ids[mask == 1]) == reply


def test_labels_are_ignored_exactly_on_non_assistant_tokens_of_a_packed_row(hf_tok):
    """Two conversations packed in one row: the trainer's labels are -100 everywhere but the assistant tokens."""
    from bigray.data.pack import pack_documents
    from bigray.train.loss import IGNORE_INDEX, shift_rows

    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"},
                           {"role": "user", "content": "what is ray"}, {"role": "assistant", "content": "ray"}]}
    _, _, ids1, mask1 = ids_and_mask(record, hf_tok)
    _, _, ids2, mask2 = ids_and_mask(RECORDS["openai"][0], hf_tok)
    assert mask1.sum() == len(hf_ids(hf_tok, " a" + EOS)) + len(hf_ids(hf_tok, " ray" + EOS))
    row_len = len(ids1) + len(ids2) + 3
    tokens, mask, seg, pad = pack_documents(np.concatenate([ids1, ids2]).astype(np.uint16),
                                            np.concatenate([mask1, mask2]), np.array([len(ids1), len(ids2)]),
                                            row_len, hf_tok.eos_token_id)
    assert tokens.shape == (1, row_len) and pad == 3
    labels = np.asarray(shift_rows(tokens, mask, seg).labels)
    targets = np.concatenate([mask1, mask2, [0, 0, 0]])[1:] == 1
    expected = np.where(targets, tokens[0, 1:].astype(np.int64), IGNORE_INDEX)
    np.testing.assert_array_equal(labels[0], expected)


def test_train_on_all_marks_every_token(hf_tok):
    _, _, ids, mask = ids_and_mask(RECORDS["openai"][0], hf_tok, train_on="all")
    assert mask.all() and len(mask) == len(ids)


def test_default_template_prompt_is_what_bigray_serve_sends(hf_tok):
    """The default only adds EOS after assistant turns to serve's fallback: a first-turn prompt is identical."""
    from bigray.serve.app import DEFAULT_CHAT_TEMPLATE as SERVE_TEMPLATE

    messages = to_messages(RECORDS["openai"][0])[:-1]
    ours = hf_tok.apply_chat_template(messages, chat_template=DEFAULT_CHAT_TEMPLATE, add_generation_prompt=True,
                                      tokenize=False)
    assert ours == hf_tok.apply_chat_template(messages, chat_template=SERVE_TEMPLATE, add_generation_prompt=True,
                                              tokenize=False)


@pytest.mark.parametrize("record, reason", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no_assistant_turn"),
    ({"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "a"}]}, "unknown_role"),
    ({"messages": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "a"}]}, "unknown_role"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}, "bad_message"),
    ({"messages": "hi"}, "bad_message"),
    ({"text": "hi"}, "missing_field"),
    ({"prompt": "hi"}, "missing_field"),
    ("not a dict", "missing_field"),
])
def test_malformed_records_name_their_reason(record, reason):
    with pytest.raises(BadRecord) as err:
        to_messages(record)
    assert err.value.reason == reason


def test_a_template_that_rewrites_history_is_a_counted_mismatch(hf_tok):
    """A template that renders earlier assistant turns differently (no clean prompt/target cut) drops the record."""
    odd = ("{% for m in messages %}{% if loop.last or m.role != 'assistant' %}{{ m.role }}: {{ m.content }}\n"
           "{% endif %}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    record = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                           {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    with pytest.raises(BadRecord, match="template_mismatch"):
        render(to_messages(record), chat_format(odd, None, SPECIALS, "assistant", "messages"))


def test_truncate_policies():
    ids, mask = list(range(10)), np.array([0, 0, 0, 0, 1, 1, 0, 0, 1, 1], dtype=np.uint8)
    assert truncate(ids, mask, 10, "drop")[0] == ids
    with pytest.raises(BadRecord, match="too_long"):
        truncate(ids, mask, 8, "drop")
    got, m = truncate(ids, mask, 8, "left")
    assert got == ids[2:] and m.tolist() == mask[2:].tolist()
    got, m = truncate(ids, mask, 6, "right")
    assert got == ids[:6] and m.tolist() == mask[:6].tolist()
    with pytest.raises(BadRecord, match="too_long"):
        truncate(ids, mask, 4, "right")  # no target left


def test_tokenizer_sample_of_sft_records_is_their_rendering(tmp_path):
    """`bigray tokenizer train` / prepare with no tokenizer learn the BPE from chats as the template renders them."""
    import json

    from bigray.config import DataConfig
    from bigray.data.read import InputFile
    from bigray.data.tokenizer import sample_format, sample_task
    from bigray.storage import Store

    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"prompt": "what is ray", "completion": "a framework"}) + "\n" + "{bad\n")
    data = DataConfig(task="sft")
    got = sample_task([InputFile(str(path), "jsonl", 0)], [0], data, Store(), 1.0, sample_format(data))
    assert got == [f"user: what is ray\nassistant: a framework{EOS}\n"]
    assert sample_format(DataConfig()) is None
