"""Fine-tuning data: every row format read (gzipped and JSON arrays too), bad rows counted with
their line or raised in strict mode; the assistant-only mask at exact positions; truncation from
the left; SFT and preference batches deterministic in (seed, step), resumable, with -100 wherever
nothing is learned."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from lmforge.data.chat_batches import (
    IGNORE,
    PreferenceBatches,
    SFTBatches,
    count_tokens,
    pad_id_of,
    render_example,
    render_examples,
    render_pair,
    render_pairs,
)
from lmforge.data.conversations import (
    PreferencePair,
    read_conversations,
    read_preferences,
)
from lmforge.errors import ConfigError, InputError
from lmforge.tokenizer import Message, render_chat
from lmforge.tokenizer.chat import render_chat_masked

from .conftest import tiny_model

S, U, A = "system", "user", "assistant"


def write_jsonl(path: Path, rows: list, gz: bool = False) -> Path:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def msgs(*turns: tuple[str, str]) -> list[Message]:
    return [Message(role, content) for role, content in turns]  # type: ignore[arg-type]


MULTI = msgs((S, "Be brief."), (U, "What is 2+2?"), (A, "4"), (U, "And 3+3, café?"),
             (A, "It is 6.\nDone."))

# --- the mask -------------------------------------------------------------------------------------


def test_masked_rendering_is_render_chat_with_the_replies_marked(tokenizer):
    ids, mask = render_chat_masked(tokenizer, MULTI)
    assert ids == render_chat(tokenizer, MULTI, add_generation_prompt=False)
    newline = tokenizer.encode("\n")
    expected_ids, expected_mask = [], []
    for m in MULTI:
        body = tokenizer.encode("\n" + m.content)
        assert body[: len(newline)] == newline  # the "\n" after a role marker is its own pretoken
        learn = int(m.role == A)
        expected_ids += [tokenizer.token_id(f"<|{m.role}|>"), *body, tokenizer.token_id("<|end|>"),
                         *newline]
        expected_mask += ([0] * (1 + len(newline)) + [learn] * (len(body) - len(newline) + 1)
                          + [0] * len(newline))
    assert (ids, mask) == (expected_ids, expected_mask)
    # each learned run starts exactly where the generation prompt of its history ends
    first = mask.index(1)
    assert ids[:first] == render_chat(tokenizer, MULTI[:2], add_generation_prompt=True)
    second = mask.index(1, mask.index(0, first))
    assert ids[:second] == render_chat(tokenizer, MULTI[:4], add_generation_prompt=True)
    assert tokenizer.decode([i for i, k in zip(ids, mask, strict=True) if k]) == \
        "4<|end|>It is 6.\nDone.<|end|>"


def test_a_reply_that_starts_with_a_line_break_is_learned_whole(tokenizer):
    ids, mask = render_chat_masked(tokenizer, msgs((U, "hi"), (A, "\n\nlist:")))
    learned = tokenizer.decode([i for i, k in zip(ids, mask, strict=True) if k])
    assert learned.endswith("\n\nlist:<|end|>") and mask[-1] == 0


# --- readers --------------------------------------------------------------------------------------

ROWS = [
    {"messages": [{"role": S, "content": "sys"}, {"role": U, "content": "hi"},
                  {"role": A, "content": "hello"}, {"role": U, "content": "bye"},
                  {"role": A, "content": [{"type": "text", "text": "see "},
                                          {"type": "text", "text": "you"}]}]},
    {"instruction": "Translate.", "input": "chat", "output": "cat"},
    {"instruction": "Name a colour.", "input": "", "output": "Red."},
    {"prompt": "Say yes.", "completion": "Yes."},
    {"question": "1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2"},
]
PARSED = [
    msgs((S, "sys"), (U, "hi"), (A, "hello"), (U, "bye"), (A, "see you")),
    msgs((U, "Translate.\n\nchat"), (A, "cat")),
    msgs((U, "Name a colour."), (A, "Red.")),
    msgs((U, "Say yes."), (A, "Yes.")),
    msgs((U, "1+1?"), (A, "1+1=<<1+1=2>>2\n#### 2")),
]


@pytest.mark.parametrize("name", ["data.jsonl", "data.jsonl.gz", "data.json", "data.json.gz"])
def test_every_conversation_format_in_every_container(tmp_path, name):
    path = tmp_path / name
    if ".jsonl" in name:
        write_jsonl(path, ROWS, gz=name.endswith(".gz"))
    else:
        text = json.dumps(ROWS, indent=1)
        if name.endswith(".gz"):
            path.write_bytes(gzip.compress(text.encode()))
        else:
            path.write_text(text)
    conversations, skipped = read_conversations(path)
    assert conversations == PARSED and skipped == []


BAD = [
    (ROWS[0], None),
    ("{not json", "invalid JSON"),
    ({"messages": [{"content": "x"}, {"role": A, "content": "y"}]}, "missing role"),
    ({"messages": [{"role": "tool", "content": "x"}, {"role": A, "content": "y"}]},
     "unknown role 'tool'"),
    ({"messages": [{"role": U, "content": "x"}, {"role": A, "content": "  "}]},
     "empty assistant turn"),
    ({"messages": [{"role": S, "content": "x"}, {"role": U, "content": "y"}]},
     "no assistant turn to learn from"),
    ({"text": "pretraining text"}, "unknown format"),
    ([1, 2], "expected a JSON object"),
    ({"chosen": "a", "rejected": "b"}, "read it with read_preferences"),
    ({"question": "q", "answer": 7}, "answer: expected a string, got int"),
]


def test_bad_rows_are_skipped_with_their_line_and_reason(tmp_path):
    rows = [r for r, _ in BAD]
    path = write_jsonl(tmp_path / "bad.jsonl", [*rows[:3], "", *rows[3:]])
    conversations, skipped = read_conversations(path)
    assert conversations == PARSED[:1]
    lines = [2, 3, *range(5, 5 + len(BAD) - 3)]  # line 4 is blank: passed over, not counted
    assert [s.line for s in skipped] == lines
    for s, (_, reason) in zip(skipped, BAD[1:], strict=True):
        assert reason in s.reason and s.path == str(path)
        assert str(s).startswith(f"{path}:{s.line}: ")


def test_strict_mode_raises_at_the_first_bad_row(tmp_path):
    no_reply = {"messages": [{"role": U, "content": "x"}]}
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[1], no_reply])
    with pytest.raises(InputError, match=r"bad\.jsonl:2: no assistant turn"):
        read_conversations(path, strict=True)
    with pytest.raises(InputError, match="expected messages, instruction"):
        read_conversations(write_jsonl(tmp_path / "u.jsonl", [{"x": 1}]), strict=True)


def test_a_missing_file_names_its_path(tmp_path):
    with pytest.raises(InputError, match=r"nowhere\.jsonl: no such file"):
        read_conversations(tmp_path / "nowhere.jsonl")


HH_HEAD = "\n\nHuman: How do I bake bread?\n\nAssistant: With flour.\n\nHuman: And then?"
HH_PROMPT = msgs((U, "How do I bake bread?"), (A, "With flour."), (U, "And then?"))


def test_preference_formats_and_the_hh_rlhf_split(tmp_path):
    rows = [
        {"chosen": HH_HEAD + "\n\nAssistant: Knead it.",
         "rejected": HH_HEAD + "\n\nAssistant:  No."},
        {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."},
        {"prompt": [{"role": S, "content": "sys"}, {"role": U, "content": "Hi?"}],
         "chosen": [{"role": A, "content": "Hello."}],
         "rejected": [{"role": A, "content": "Go away."}]},
        {"chosen": [{"role": U, "content": "Hi?"}, {"role": A, "content": "Hello."}],
         "rejected": [{"role": U, "content": "Hi?"}, {"role": A, "content": "Go away."}]},
    ]
    pairs, skipped = read_preferences(write_jsonl(tmp_path / "p.jsonl.gz", rows, gz=True))
    assert skipped == []
    assert pairs == [
        PreferencePair(tuple(HH_PROMPT), "Knead it.", "No."),
        PreferencePair((Message(U, "Hi?"),), "Hello.", "Go away."),
        PreferencePair((Message(S, "sys"), Message(U, "Hi?")), "Hello.", "Go away."),
        PreferencePair((Message(U, "Hi?"),), "Hello.", "Go away."),
    ]


def test_bad_preference_rows_are_counted(tmp_path):
    rows = [
        {"prompt": "Hi?", "chosen": "Same.", "rejected": "Same."},
        {"chosen": HH_HEAD + "\n\nAssistant: A", "rejected": "\n\nHuman: other\n\nAssistant: B"},
        {"chosen": HH_HEAD + "\n\nAssistant: ", "rejected": HH_HEAD + "\n\nAssistant: B"},
        {"prompt": "Hi?", "chosen": [{"role": U, "content": "x"}], "rejected": "B"},
        {"prompt": "Hi?", "completion": "x"},
        {"chosen": "no turns here", "rejected": "none here"},
    ]
    pairs, skipped = read_preferences(write_jsonl(tmp_path / "p.jsonl", rows))
    assert pairs == []
    assert [(s.line, s.reason) for s in skipped] == [
        (1, "chosen equals rejected"),
        (2, "chosen and rejected must share the dialogue before the last Assistant turn"),
        (3, "empty chosen reply"),
        (4, "chosen: expected a string or a list of one assistant message"),
        (5, "unknown format (keys ['completion', 'prompt']); expected prompt+chosen+rejected "
            "or chosen+rejected"),
        (6, 'expected HH-RLHF transcripts with an "\\n\\nAssistant:" turn'),
    ]
    with pytest.raises(InputError, match=r"p\.jsonl:1: chosen equals rejected"):
        read_preferences(tmp_path / "p.jsonl", strict=True)


# --- rendering ------------------------------------------------------------------------------------


def test_a_long_conversation_loses_the_start_of_its_history(tokenizer):
    ids, mask = render_chat_masked(tokenizer, MULTI)
    whole = render_example(tokenizer, MULTI, context=len(ids) - 1)
    assert not whole.truncated and whole.ids.tolist() == ids
    cut = render_example(tokenizer, MULTI, context=12)
    assert cut.truncated and cut.ids.tolist() == ids[-13:] and cut.mask.tolist() == mask[-13:]
    # a last user turn that fills the context leaves nothing to learn: dropped and counted
    long_question = [*MULTI, Message(U, "why " * len(ids))]
    examples, report = render_examples(tokenizer, [MULTI, long_question, MULTI[:3]],
                                       context=len(ids) - 3)
    assert (report.kept, report.truncated, report.dropped) == (2, 1, 1)
    assert len(examples) == 2 and all(e.learns for e in examples)


def test_a_pair_is_masked_on_its_last_reply_and_dropped_when_the_reply_is_cut(tokenizer):
    pair = PreferencePair(tuple(HH_PROMPT), "Knead it well.", "No.")
    chosen, rejected = render_pair(tokenizer, pair, context=256)
    for side, reply in ((chosen, pair.chosen), (rejected, pair.rejected)):
        learned = side.ids[side.mask].tolist()
        assert tokenizer.decode(learned) == reply + "<|end|>"  # not the earlier "With flour."
    long = PreferencePair(tuple(HH_PROMPT), "Knead " * 30, "No.")
    kept, report = render_pairs(tokenizer, [pair, long], context=20)
    assert len(kept) == 1 and (report.kept, report.dropped) == (1, 1)
    assert report.truncated == 1  # the kept pair lost the start of its prompt


# --- batches --------------------------------------------------------------------------------------


def conversations(n: int) -> list[list[Message]]:
    return [msgs((U, f"question {i} " + "x" * (i % 7)), (A, f"answer {i} " + "y" * (i % 5)))
            for i in range(n)]


def sft(tokenizer, n: int = 40, **kw) -> SFTBatches:
    examples, _ = render_examples(tokenizer, conversations(n), context=64)
    return SFTBatches(examples, **{"batch_size": 4, "seq_len": 64, "seed": 1,
                                   "pad_id": pad_id_of(tokenizer), **kw})


def draw(batches, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [batches.next_batch() for _ in range(k)]


def same(a, b) -> bool:
    return all(torch.equal(x, y) for p, q in zip(a, b, strict=True)
               for x, y in zip(p, q, strict=True))


def test_batches_are_a_function_of_seed_and_step_and_resume_exactly(tokenizer):
    first = draw(sft(tokenizer), 25)  # 10 batches per epoch: crosses two epoch boundaries
    assert same(first, draw(sft(tokenizer), 25))
    assert not same(first[:10], draw(sft(tokenizer, seed=2), 10))
    jumped = sft(tokenizer)
    jumped.step = 13  # a rollback moves step forward
    assert same(first[13:], draw(jumped, 12))
    saved = sft(tokenizer)
    draw(saved, 7)
    resumed = sft(tokenizer)
    resumed.load_state_dict(saved.state_dict())
    assert same(first[7:], draw(resumed, 18))
    with pytest.raises(ConfigError, match="seed was 1, is 3"):
        sft(tokenizer, seed=3).load_state_dict(saved.state_dict())
    with pytest.raises(ConfigError, match="num_items"):
        SFTBatches(sft(tokenizer).examples[:-4], 4, 64, seed=1).load_state_dict(saved.state_dict())


def test_an_epoch_visits_each_example_once_grouped_by_length(tokenizer):
    batches = sft(tokenizer, n=42)
    plan = batches.epoch_plan(0)
    assert plan.shape == (10, 4) and len(set(plan.ravel().tolist())) == 40  # 2 left for later
    for row in plan:  # one run of GROUP batches here: each batch is a slice of the sorted run
        lengths = batches.lengths[row]
        assert (lengths[:-1] <= lengths[1:]).all()
    assert not (batches.epoch_plan(1) == plan).all()


def test_targets_are_the_next_token_only_where_the_reply_is(tokenizer):
    examples, _ = render_examples(tokenizer, conversations(8), context=64)
    pad = pad_id_of(tokenizer)
    ids, targets = SFTBatches(examples, batch_size=8, seq_len=64, pad_id=pad).next_batch()
    assert ids.dtype == targets.dtype == torch.int64
    assert ids.shape == targets.shape == (8, max(len(e) for e in examples) - 1)
    by_inputs = {tuple(e.ids[:-1].tolist()): e for e in examples}
    for row_ids, row_targets in zip(ids, targets, strict=True):
        n = int((row_ids != pad).sum()) + 1
        e = by_inputs[tuple(row_ids[: n - 1].tolist())]
        expected = [int(t) if k else IGNORE for t, k in zip(e.ids[1:], e.mask[1:], strict=True)]
        assert row_targets[: n - 1].tolist() == expected
        assert (row_targets[n - 1 :] == IGNORE).all() and (row_ids[n - 1 :] == pad).all()
    real, learned = count_tokens((ids, targets), pad)
    assert real == sum(len(e) - 1 for e in examples)
    assert learned == sum(int(e.mask[1:].sum()) for e in examples)
    model = tiny_model(vocab_size=tokenizer.vocab_size, context=64)
    assert torch.isfinite(model(ids, targets))


def test_preference_batches_put_chosen_rows_first(tokenizer):
    pairs = [PreferencePair((Message(U, f"q{i}"),), f"good answer {i}", f"bad {i}")
             for i in range(6)]
    rendered, _ = render_pairs(tokenizer, pairs, context=64)
    batches = PreferenceBatches(rendered, batch_size=3, seq_len=64, seed=0,
                                pad_id=pad_id_of(tokenizer))
    ids, targets = batches.next_batch()
    assert ids.shape[0] == targets.shape[0] == 6
    replies = [tokenizer.decode([t for t in row.tolist() if t != IGNORE]) for row in targets]
    prompts = [tokenizer.decode(row.tolist()).split("<|assistant|>")[0] for row in ids]
    for i in range(3):
        k = int(replies[i].split()[-1].removesuffix("<|end|>"))
        assert replies[i] == f"good answer {k}<|end|>" and replies[3 + i] == f"bad {k}<|end|>"
        assert prompts[i] == prompts[3 + i] == f"<|user|>\nq{k}<|end|>\n"
    again = PreferenceBatches(rendered, batch_size=3, seq_len=64, seed=0,
                              pad_id=pad_id_of(tokenizer))
    again.load_state_dict(batches.state_dict())
    assert same(draw(batches, 3), draw(again, 3))


def test_batches_reject_examples_that_do_not_fit(tokenizer):
    examples, _ = render_examples(tokenizer, conversations(8), context=64)
    with pytest.raises(InputError, match="expected at most seq_len"):
        SFTBatches(examples, batch_size=2, seq_len=8)
    with pytest.raises(InputError, match="too few"):
        SFTBatches(examples, batch_size=16, seq_len=64)
