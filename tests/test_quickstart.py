"""The quickstart end to end, on a small corpus of files instead of the built-in one."""

from __future__ import annotations

import json

from lmforge.quickstart import QuickstartConfig, quickstart
from lmforge.tokenizer import Tokenizer

from .conftest import synthetic_documents


def test_quickstart_runs_end_to_end(tmp_path, capsys):
    for i, doc in enumerate(synthetic_documents(400)):
        (tmp_path / f"doc{i:03}.txt").write_text(doc, encoding="utf-8")
    out = tmp_path / "run"
    report = quickstart(QuickstartConfig(out_dir=str(out), corpus=[str(tmp_path / "*.txt")],
                                         vocab_size=500, val_fraction=0.1, progress=False,
                                         preset="code", steps=6, batch_size=2, seq_len=32))
    assert report["validation_lossless"] is True
    assert report["bytes_per_token"] > 1.0
    assert Tokenizer.load(out / "tokenizer.lmforge.json").vocab_size == 500
    assert json.loads((out / "quickstart.json").read_text())["vocab_size"] == 500
    assert (out / "hf" / "tokenizer.json").is_file() and (out / "tiktoken" / "tokenizer.tiktoken"
                                                          ).is_file()
    assert report["data"]["num_tokens"] > 0 and report["data"]["splits"]["val"]["documents"]
    assert (out / "data" / "manifest.json").is_file()
    assert report["train"]["step"] == 6 and (out / "train" / "loss.png").is_file()
    printed = capsys.readouterr().out
    assert "bytes/token" in printed and "unigram baseline bpb" in printed.splitlines()[-1]
    assert "no --task-data: benchmarks skipped" in printed
    evaluation = json.loads((out / "train" / "eval" / "eval.json").read_text())
    assert evaluation["tasks"]["bpb"]["metrics"]["bpb"] > 0
    assert (out / "train" / "report.html").is_file() and (out / "train" / "report.md").is_file()

    again = quickstart(QuickstartConfig(out_dir=str(out), corpus=[str(tmp_path / "*.txt")],
                                        vocab_size=500, val_fraction=0.1, progress=False,
                                        preset="code", steps=6, batch_size=2, seq_len=32,
                                        chat=True, chat_steps=4))
    assert again["data"]["num_tokens"] == report["data"]["num_tokens"]  # reused
    printed = capsys.readouterr().out
    assert "holds an earlier run: continuing it" in printed
    # --chat: SFT then DPO on the built-in docstring sets, measured before and after
    chat = again["chat"]
    assert chat["sft_run"]["step"] == 4 and chat["dpo_run"]["step"] == 2
    for model in ("base", "sft", "dpo"):
        assert set(chat[model]) >= {"assistant_loss", "ended_share", "preference_accuracy"}
        assert 0 <= chat[model]["ended_share"] <= 1 and chat[model]["replies"]
    assert (out / "sft" / "config.json").is_file() and (out / "dpo" / "checkpoints").is_dir()
    assert f"lmforge chat --checkpoint {out}/dpo" in printed
