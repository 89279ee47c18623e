"""``lmforge chat``: each reply continues the rendered history; old turns make way for new ones
within the context; /reset, /exit and mistyped commands; the CLI runs the same loop on stdin."""

from __future__ import annotations

import io
import sys

import pytest

from lmforge.cli import main
from lmforge.errors import ConfigError, InputError
from lmforge.export.hf import export_hf
from lmforge.inference import generate_text
from lmforge.inference.chat import ChatConfig, chat
from lmforge.model import Transformer
from lmforge.tokenizer import CHAT_TOKENS, ENDOFTEXT, Message, Tokenizer, render_chat

from .conftest import synthetic_documents, tiny_model

GREEDY = ChatConfig(system="Be brief.", max_new_tokens=8, temperature=0)


def run(model: Transformer, tok: Tokenizer, lines: list[str], config: ChatConfig = GREEDY
        ) -> tuple[list[Message], str, list[str]]:
    out: list[str] = []
    notes: list[str] = []
    history = chat(model, tok, lines, out.append, config, notify=notes.append)
    return history, "".join(out), notes


def reply_to(model: Transformer, tok: Tokenizer, messages: list[Message]) -> str:
    """The greedy reply that the chat loop should give after ``messages``."""
    stops = [tok.token_id(s) for s in (*CHAT_TOKENS, ENDOFTEXT)]
    return "".join(generate_text(model, tok, render_chat(tok, messages), GREEDY,
                                 stop_ids=stops))


def test_each_reply_continues_the_rendered_history(tokenizer):
    model = tiny_model(vocab_size=tokenizer.vocab_size, context=256)
    history, out, notes = run(model, tokenizer, ["hello there\n", "tell me more\n"])
    assert [(m.role, m.content) for m in history[:2]] == [("system", "Be brief."),
                                                          ("user", "hello there")]
    assert [m.role for m in history[2:]] == ["assistant", "user", "assistant"]
    assert history[2].content == reply_to(model, tokenizer, history[:2])
    assert history[4].content == reply_to(model, tokenizer, history[:4])
    assert history[2].content != history[4].content
    assert out == f"{history[2].content}\n\n{history[4].content}\n\n"  # piped: blank lines
    assert notes == []


def test_oldest_turns_make_way_and_the_system_message_stays(tokenizer):
    model = tiny_model(vocab_size=tokenizer.vocab_size, context=64)
    lines = [f"question {i}: the model learns byte pair merges" for i in range(5)]
    history, _, notes = run(model, tokenizer, lines)
    assert any(n.startswith("dropped the oldest 1 turn(s)") for n in notes)
    assert history[0] == Message("system", "Be brief.")
    users = [m.content for m in history if m.role == "user"]
    assert 1 <= len(users) < 5 and users == lines[-len(users):]
    # the prompt of the last reply left max_new_tokens of the 64 free
    assert len(render_chat(tokenizer, history[:-1])) <= 64 - GREEDY.max_new_tokens


def test_a_message_longer_than_the_context_is_refused_and_the_chat_goes_on(tokenizer):
    model = tiny_model(vocab_size=tokenizer.vocab_size, context=64)
    history, out, notes = run(model, tokenizer, ["hi", "word " * 80, "bye"])
    assert len(notes) == 1 and notes[0].startswith("message too long")
    assert "56 of the model's 64 context tokens" in notes[0]
    assert [m.content for m in history if m.role == "user"] == ["hi", "bye"]
    assert out.count("\n") >= 2


def test_reset_exit_and_mistyped_commands(tokenizer):
    model = tiny_model(vocab_size=tokenizer.vocab_size, context=256)
    history, out, notes = run(model, tokenizer,
                              ["hello", "more", "/reset", "hello", "/help", "", "/exit", "late"])
    assert notes[0] == "conversation reset"
    assert notes[1].startswith("unknown command /help; commands: /reset")
    assert [m.content for m in history if m.role == "user"] == ["hello"]  # "late" never read
    assert out.startswith(history[-1].content + "\n")  # after /reset, as at the start (greedy)


def test_chat_needs_the_chat_tokens_and_sane_settings(tokenizer):
    plain = Tokenizer.train(synthetic_documents(20), 300, special_tokens=["<|endoftext|>"],
                            workers=1, show_progress=False)
    with pytest.raises(InputError, match="lacks the chat special tokens"):
        run(tiny_model(vocab_size=300, context=64), plain, ["hi"])
    with pytest.raises(ConfigError, match=r"top_p: must be in \(0, 1\]"):
        ChatConfig(top_p=0.0)
    with pytest.raises(ConfigError, match="max_new_tokens: must be >= 1"):
        ChatConfig(max_new_tokens=0)


def test_cli_chat_reads_standard_input(tokenizer, tmp_path, monkeypatch, capsys):
    model = tiny_model(vocab_size=tokenizer.vocab_size, context=128)
    export_hf(model, tokenizer, tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there\n/exit\n"))
    assert main(["chat", "--checkpoint", str(tmp_path), "--system", "Be brief.",
                 "--max-new-tokens", "8", "--temperature", "0", "--top-k", "none"]) == 0
    out = capsys.readouterr().out
    assert out == reply_to(model, tokenizer, [Message("system", "Be brief."),
                                              Message("user", "hello there")]) + "\n\n"
    assert main(["chat", "--checkpoint", str(tmp_path), "--top-p", "2"]) == 2
    assert "--top-p: must be in (0, 1] or none, got 2.0" in capsys.readouterr().err


def test_ctrl_c_stops_the_reply_not_the_conversation(tokenizer, monkeypatch):
    import lmforge.inference.chat as chat_module

    model = tiny_model(vocab_size=tokenizer.vocab_size, context=256)
    real = chat_module.generate_text
    calls = {"n": 0}

    def interrupted_first_time(*args, **kwargs):
        calls["n"] += 1
        stream = real(*args, **kwargs)
        if calls["n"] > 1:
            return stream

        def cut():
            yield next(stream)
            raise KeyboardInterrupt

        return cut()

    monkeypatch.setattr(chat_module, "generate_text", interrupted_first_time)
    history, _, notes = run(model, tokenizer, ["hello\n", "again\n"])
    assert [m.role for m in history] == ["system", "user", "assistant", "user", "assistant"]
    assert history[2].content and any("reply stopped" in n for n in notes)
    assert history[4].content == reply_to(model, tokenizer, history[:4])
