"""The built-in instruction and preference sets read from the stdlib's docstrings."""

from __future__ import annotations

import pytest

from lmforge.data.chat_builtin import (
    MAX_SUMMARY,
    MIN_SUMMARY,
    DocItem,
    docs_conversations,
    docs_items,
    docs_preferences,
    question,
    summary_of,
)
from lmforge.errors import ConfigError


def test_textwrap_dedent_is_an_item_about_whitespace():
    by_name = {it.name: it for it in docs_items()}
    dedent = by_name["textwrap.dedent"]
    assert dedent.kind == "function"
    assert "whitespace" in dedent.summary.lower() or "indent" in dedent.summary.lower()
    assert by_name["collections.OrderedDict"].kind == "class"
    assert by_name["collections.OrderedDict.move_to_end"].kind == "method"


def test_items_are_unique_public_and_bounded():
    items = docs_items()
    assert len(items) > 1000
    assert len({it.name for it in items}) == len(items)
    assert {it.kind for it in items} == {"function", "class", "method"}
    for it in items:
        assert not any(part.startswith("_") for part in it.name.split("."))
        assert MIN_SUMMARY <= len(it.summary) <= MAX_SUMMARY
        assert "\n" not in it.summary and "  " not in it.summary
        assert it.summary == it.summary.strip()


def test_summary_of_takes_the_first_prose_paragraph():
    assert summary_of("Add one to x and return it.\n\n    More detail.\n") == (
        "Add one to x and return it.")
    assert summary_of("f(x) -> int\n\nAdd one to x and return it.") == (
        "Add one to x and return it.")
    assert summary_of("Return ``True`` if the :class:`Mock` was called.") == (
        "Return `True` if the `Mock` was called.")
    assert summary_of("D.get(k[,d]) -> D[k] if k in D, else d.  d defaults to None.") is None
    assert summary_of("Too short.") is None
    assert summary_of("x" * (MAX_SUMMARY + 1)) is None
    assert summary_of(">>> f(1)\n2") is None
    assert summary_of("Returns one of the following values:\n  a, b") is None
    assert summary_of(None) is None


def test_splits_are_disjoint_nonempty_and_deterministic():
    train, val = docs_conversations("train"), docs_conversations("val")
    assert train and val
    assert len(train) + len(val) == len(docs_items())
    train_questions = {c[0].content for c in train}
    assert not train_questions & {c[0].content for c in val}
    assert docs_conversations("val") == val
    assert docs_preferences("val") == docs_preferences("val")
    assert docs_conversations("train", val_fraction=0.0) and not docs_conversations(
        "val", val_fraction=0.0)


def test_conversations_are_a_question_and_its_summary():
    summaries = {it.summary for it in docs_items()}
    for conv in docs_conversations("train") + docs_conversations("val"):
        assert [m.role for m in conv] == ["user", "assistant"]
        assert conv[0].content.strip() and conv[1].content in summaries
    asked = {question(it)[:12] for it in docs_items()}
    assert len(asked) >= 4  # the templates vary


def test_preference_pairs_reject_another_items_summary():
    items = docs_items()
    summaries = {it.summary for it in items}
    for split in ("train", "val"):
        convs = docs_conversations(split)
        pairs = docs_preferences(split)
        assert len(pairs) == len(convs)
        for pair, conv in zip(pairs, convs, strict=True):
            assert pair.prompt == (conv[0],) and pair.chosen == conv[1].content
            assert pair.rejected != pair.chosen and pair.rejected in summaries


def test_val_preferences_stay_within_val():
    val_summaries = {c[1].content for c in docs_conversations("val")}
    assert all(p.rejected in val_summaries for p in docs_preferences("val"))


def test_bad_arguments_are_rejected():
    with pytest.raises(ConfigError, match="split"):
        docs_conversations("test")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="val_fraction"):
        docs_preferences("val", val_fraction=1.0)


def test_question_names_the_item():
    it = DocItem("textwrap.dedent", "function", "Remove any common leading whitespace.")
    assert "`textwrap.dedent`" in question(it)
