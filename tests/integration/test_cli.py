"""The `bigray` command end to end on a local Ray cluster: tokenizer training and prepare through main()."""

from __future__ import annotations

import json

from bigray.cli import main


def test_tokenizer_train_and_prepare_through_cli(tmp_path, ray_cluster, capsys):
    from transformers import AutoTokenizer

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(40):
        (docs / f"{i}.txt").write_text(f"document number {i} " * (i + 5))
    base = [f"data.inputs=[{docs}]", f"data.tokenizer={tmp_path}/tok", "data.vocab_size=270", "data.seq_len=16"]
    assert main(["tokenizer", "train", *base]) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok", local_files_only=True)
    assert tok.eos_token_id is not None
    assert main(["prepare", *base, f"data.output={tmp_path}/out"]) == 0
    printed = capsys.readouterr().out
    assert "docs" not in printed or "kept" in printed
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["stats"]["docs_kept"] == 40 and "tokens/s" in printed
