"""Quality filters: every rule on both sides of its threshold, C4 line removal, presets, configs."""

from __future__ import annotations

import pickle
from itertools import islice

import pytest

from lmforge.data.builtin import python_src
from lmforge.data.filters import (
    PRESETS,
    C4Config,
    C4Filter,
    CodeConfig,
    CodeFilter,
    FilterResult,
    FineWebConfig,
    FineWebFilter,
    GopherQualityConfig,
    GopherQualityFilter,
    GopherRepetitionConfig,
    GopherRepetitionFilter,
    apply_filters,
    build_filters,
)
from lmforge.errors import ConfigError


def words(n: int, start: int = 0) -> list[str]:
    """``n`` distinct 4-letter words ("qaaa", "qaab", …): never stop words, never repeated."""
    return ["q" + "".join(chr(97 + i // 26**k % 26) for k in (2, 1, 0))
            for i in range(start, start + n)]


def pairs(n: int, start: int = 0) -> list[str]:
    """``n`` distinct 2-letter words, disjoint from :func:`words`."""
    return ["".join(chr(97 + i // 26**k % 26) for k in (1, 0)) for i in range(start, start + n)]


def plain(n: int) -> list[str]:
    """``n`` words with exactly two stop words."""
    return ["the", "and", *words(n - 2)]


def lines_of(tokens: list[str]) -> str:
    """Sentences of 10 words, one per line."""
    return "\n".join(" ".join(tokens[i:i + 10]) + "." for i in range(0, len(tokens), 10))


def edit(tokens: list[str], indices: range, fn) -> list[str]:
    tokens = list(tokens)
    for i in indices:
        tokens[i] = fn(tokens[i])
    return tokens


def verdict(result: FilterResult) -> str | None:
    assert result.keep == (result.reason is None)
    return result.reason


# --- Gopher quality -------------------------------------------------------------------------------

def bullets(n_bullet: int, bullet: str = "-") -> str:
    rows = lines_of(plain(100)).split("\n")
    return "\n".join(f"{bullet} {row}" if i < n_bullet else row for i, row in enumerate(rows))


def trailing_ellipses(n: int) -> str:
    rows = lines_of(plain(100)).split("\n")
    return "\n".join(row[:-1] + "..." if i < n else row for i, row in enumerate(rows))


def letters(n_alpha: int, accented: bool = False) -> str:
    alpha = plain(n_alpha)
    if accented:
        alpha = alpha[:2] + [w.replace("q", "é") for w in alpha[2:]]
    return " ".join(alpha + ["—" if accented else "123"] * (100 - n_alpha))


GOPHER_QUALITY = [
    ("50 words", " ".join(plain(50)), None),
    ("49 words", " ".join(plain(49)), "min_words"),
    ("empty", "", "min_words"),
    ("100,000 words", " ".join(["the", "and"] + ["word"] * 99_998), None),
    ("100,001 words", " ".join(["the", "and"] + ["word"] * 99_999), "max_words"),
    ("mean length 3", " ".join(["the", "and"] + ["abc"] * 48), None),
    ("mean length 2.98", " ".join(["the", "and", "ab"] + ["abc"] * 47), "min_mean_word_length"),
    ("mean length 10", " ".join(["the", "and", "a" * 24] + ["a" * 10] * 47), None),
    ("mean length 10.02", " ".join(["the", "and", "a" * 25] + ["a" * 10] * 47),
     "max_mean_word_length"),
    ("10% '#'", " ".join(edit(plain(100), range(2, 12), "#".__add__)), None),
    ("11% '#'", " ".join(edit(plain(100), range(2, 13), "#".__add__)), "max_hash_ratio"),
    ("10% ellipses", " ".join(edit(plain(100), range(2, 12), lambda w: w + "…")), None),
    ("11% ellipses", " ".join(edit(plain(100), range(2, 13), lambda w: w + "...")),
     "max_ellipsis_ratio"),
    ("90% bullet lines", bullets(9), None),
    ("100% bullet lines", bullets(10, "•"), "max_bullet_line_fraction"),
    ("30% lines end in ...", trailing_ellipses(3), None),
    ("40% lines end in ...", trailing_ellipses(4), "max_ellipsis_line_fraction"),
    ("80% words with a letter", letters(80), None),
    ("79% words with a letter", letters(79), "min_alpha_word_fraction"),
    ("80% words with a letter, Unicode", letters(80, accented=True), None),
    ("79% words with a letter, Unicode", letters(79, accented=True), "min_alpha_word_fraction"),
    ("2 stop words, any case and punctuation", " ".join(["The,", "AND", *words(60)]), None),
    ("1 stop word", " ".join(["the", *words(60)]), "min_stop_words"),
]


@pytest.mark.parametrize(("text", "reason"), [c[1:] for c in GOPHER_QUALITY],
                         ids=[c[0] for c in GOPHER_QUALITY])
def test_gopher_quality(text, reason):
    expected = f"gopher_quality:{reason}" if reason else None
    assert verdict(GopherQualityFilter()(text)) == expected


# --- Gopher repetition ----------------------------------------------------------------------------

NO_NGRAM_RULES = {"max_top_ngram_char_fraction": [1.0] * 3,
                  "max_dup_ngram_char_fraction": [1.0] * 6}
NO_LINE_RULES = {"max_dup_line_fraction": 1.0, "max_dup_line_char_fraction": 1.0,
                 **NO_NGRAM_RULES}


def short_line_repeats(copies: int) -> str:
    """6 long distinct lines and ``copies`` of the line "ok" between them."""
    rows = lines_of(words(60)).split("\n")
    return "\n".join(rows[:3] + ["ok"] * copies + rows[3:])


def long_line_repeat(distinct: int) -> str:
    """``distinct`` lines of equal length, then a copy of the first one."""
    rows = lines_of(words(10 * distinct)).split("\n")
    return "\n".join([*rows, rows[0]])


def paragraph_repeats(copies: int) -> str:
    """6 distinct 3-line paragraphs and ``copies`` of the paragraph "ok"."""
    paras = [lines_of(words(30, 30 * i)) for i in range(6)]
    return "\n\n".join(paras[:3] + ["ok"] * copies + paras[3:])


def long_paragraph_repeat(distinct: int) -> str:
    paras = [lines_of(words(20, 20 * i)) for i in range(distinct)]
    return "\n\n".join([*paras, paras[0]])


def top_ngram(n: int, occurrences: int, fillers: int) -> str:
    """A fixed n-gram of 2-letter words ``occurrences`` times, separated by 4-letter fillers.

    It covers 2n·occurrences of the 4·fillers + 2n·occurrences word characters."""
    gram, pool, out = pairs(n), words(fillers), []
    for i in range(occurrences):
        out += gram + pool[i * fillers // occurrences:(i + 1) * fillers // occurrences]
    return " ".join(out)


def repeated_phrases(n: int, phrases: int, fillers: int) -> str:
    """``phrases`` distinct n-word phrases, each twice: their second copies (2n characters each)
    are the duplicates, of 4n·phrases + 4·fillers word characters."""
    pool, chunks, out = words(fillers), 2 * phrases, []
    for i in range(chunks):
        out += pairs(n, n * (i % phrases))
        out += pool[i * fillers // chunks:(i + 1) * fillers // chunks]
    return " ".join(out)


# (n, phrases, fillers) putting duplicate n-gram coverage exactly on the Table A1 limit.
DUP_AT_LIMIT = [(5, 3, 35), (6, 7, 108), (7, 13, 259), (8, 3, 76), (9, 11, 351), (10, 1, 40)]
# (n, occurrences, fillers) putting the top n-gram's coverage exactly on the limit.
TOP_AT_LIMIT = [(2, 10, 40), (3, 6, 41), (4, 4, 42)]

GOPHER_REPETITION = [
    ("30% duplicate lines", short_line_repeats(4), NO_NGRAM_RULES, None),
    ("36% duplicate lines", short_line_repeats(5), NO_NGRAM_RULES, "max_dup_line_fraction"),
    ("20% characters in duplicate lines", long_line_repeat(4), NO_NGRAM_RULES, None),
    ("25% characters in duplicate lines", long_line_repeat(3), NO_NGRAM_RULES,
     "max_dup_line_char_fraction"),
    ("30% duplicate paragraphs", paragraph_repeats(4), NO_NGRAM_RULES, None),
    ("36% duplicate paragraphs", paragraph_repeats(5), NO_NGRAM_RULES, "max_dup_para_fraction"),
    ("20% characters in duplicate paragraphs", long_paragraph_repeat(4), NO_LINE_RULES, None),
    ("25% characters in duplicate paragraphs", long_paragraph_repeat(3), NO_LINE_RULES,
     "max_dup_para_char_fraction"),
    # "ha ha ha ha": 3 overlapping "ha ha" cover 8 characters, not 12.
    ("overlapping top 2-gram", " ".join(["ha"] * 4 + words(12)), {}, None),
    ("overlapping top 2-gram, above", " ".join(["ha"] * 6 + words(11)), {},
     "max_top_2gram_char_fraction"),
    *[(f"top {n}-gram at limit", top_ngram(n, k, f), {}, None) for n, k, f in TOP_AT_LIMIT],
    *[(f"top {n}-gram above", top_ngram(n, k, f - 1), {}, f"max_top_{n}gram_char_fraction")
      for n, k, f in TOP_AT_LIMIT],
    *[(f"duplicate {n}-grams at limit", repeated_phrases(n, r, f), {}, None)
      for n, r, f in DUP_AT_LIMIT],
    *[(f"duplicate {n}-grams above", repeated_phrases(n, r, f - 1), {},
       f"max_dup_{n}gram_char_fraction") for n, r, f in DUP_AT_LIMIT],
    ("nothing repeats", lines_of(words(500)), {}, None),
]


@pytest.mark.parametrize(("text", "config", "reason"), [c[1:] for c in GOPHER_REPETITION],
                         ids=[c[0] for c in GOPHER_REPETITION])
def test_gopher_repetition(text, config, reason):
    expected = f"gopher_repetition:{reason}" if reason else None
    assert verdict(GopherRepetitionFilter(GopherRepetitionConfig(**config))(text)) == expected


# --- C4 -------------------------------------------------------------------------------------------

SENTENCE = "This line has five words."


def test_c4_removes_lines_and_citations():
    text = "\n".join([
        "  Paris is the capital of France.[1] It is large.[citation needed]  ",
        "A heading without terminal punctuation at all",
        "Too short.",
        "Please enable JavaScript in your browser to continue.",
        "This site uses cookies, as our cookie policy explains.",
        '"Quoted lines count as ending a sentence," she said.”',
        SENTENCE,
    ])
    result = C4Filter()(text)
    assert result.keep
    assert result.text == "\n".join([
        "Paris is the capital of France. It is large.",
        '"Quoted lines count as ending a sentence," she said.”',
        SENTENCE,
    ])


C4_CASES = [
    ("5 words per line", "\n".join([SENTENCE] * 3), {}, None),
    ("4 words per line", "\n".join(["This line has four."] * 3), {}, "min_sentences"),
    ("3 sentences", f"{SENTENCE} Another one here!\n{SENTENCE}", {}, None),
    ("2 sentences", f"{SENTENCE}\n{SENTENCE}\nno ending here at all", {}, "min_sentences"),
    ("lorem ipsum", "\n".join([SENTENCE] * 3 + ["Lorem Ipsum dolor sit amet."]), {},
     "drop_lorem_ipsum"),
    ("curly bracket", "\n".join([SENTENCE] * 3 + ["x = {}"]), {}, "drop_curly_bracket"),
    ("curly bracket allowed", "\n".join([SENTENCE] * 3 + ["x = {}"]),
     {"drop_curly_bracket": False}, None),
    ("bad words off by default", "\n".join([SENTENCE] * 3 + ["Darn, this is bad."]), {}, None),
    ("bad word", "\n".join([SENTENCE] * 3 + ["Darn, this is bad."]), {"bad_words": ["darn"]},
     "bad_words"),
    ("bad word inside a word", "\n".join([SENTENCE] * 3 + ["Darning socks is fine."]),
     {"bad_words": ["darn"]}, None),
    ("3 words per line, as configured", "\n".join(["Short but fine."] * 3),
     {"min_words_per_line": 3}, None),
]


@pytest.mark.parametrize(("text", "config", "reason"), [c[1:] for c in C4_CASES],
                         ids=[c[0] for c in C4_CASES])
def test_c4_rules(text, config, reason):
    expected = f"c4:{reason}" if reason else None
    assert verdict(C4Filter(C4Config(**config))(text)) == expected


# --- FineWeb --------------------------------------------------------------------------------------

def fineweb_lines(n: int, punctuated: int = -1, short: int = 0) -> list[str]:
    """``n`` distinct lines of 10 words (49 characters), the first ``short`` of 4 words (19)."""
    pool = words(10 * n)
    rows = [" ".join(pool[10 * i:10 * i + (4 if i < short else 10)]) for i in range(n)]
    return [r + "." if i < punctuated or punctuated < 0 else r for i, r in enumerate(rows)]


FINEWEB = [
    ("12% punctuated lines", "\n".join(fineweb_lines(25, punctuated=3)), None),
    ("8% punctuated lines", "\n".join(fineweb_lines(25, punctuated=2)),
     "min_punct_line_fraction"),
    ("10% characters in duplicate lines", "\n".join(fineweb_lines(9) + fineweb_lines(1)), None),
    ("11% characters in duplicate lines", "\n".join(fineweb_lines(8) + fineweb_lines(1)),
     "max_dup_line_char_fraction"),
    ("67% short lines", "\n".join(fineweb_lines(100, short=67)), None),
    ("68% short lines", "\n".join(fineweb_lines(100, short=68)), "max_short_line_fraction"),
    ("0.3 newlines per word", "\n".join(fineweb_lines(10)) + "\n" * 21, None),
    ("0.31 newlines per word", "\n".join(fineweb_lines(10)) + "\n" * 22,
     "max_newline_word_ratio"),
    ("empty", " \n \n", "empty"),
]


@pytest.mark.parametrize(("text", "reason"), [c[1:] for c in FINEWEB],
                         ids=[c[0] for c in FINEWEB])
def test_fineweb(text, reason):
    expected = f"fineweb:{reason}" if reason else None
    assert verdict(FineWebFilter()(text)) == expected


# --- Code -----------------------------------------------------------------------------------------

CODE = [
    ("20 characters", "x = 1\n" * 3 + "y\n", None),
    ("19 characters", "x = 1\n" * 3 + "y", "min_chars"),
    ("line of 1000", "x = '" + "a" * 994 + "'\n" + "y = 1\n" * 20, None),
    ("line of 1001", "x = '" + "a" * 995 + "'\n" + "y = 1\n" * 20, "max_line_length"),
    ("mean line length 100", "a" * 199 + "\n", None),
    ("mean line length 100.5", "a" * 200 + "\n", "max_mean_line_length"),
    ("25% alphanumeric", "abcde" + "+" * 15, None),
    ("20% alphanumeric", "abcd" + "+" * 16, "min_alnum_fraction"),
    ("25% alphanumeric, Unicode", "é2ß4ñ" + "→" * 15, None),
    ("20% alphanumeric, Unicode", "é2ß4" + "→" * 16, "min_alnum_fraction"),
]


@pytest.mark.parametrize(("text", "reason"), [c[1:] for c in CODE], ids=[c[0] for c in CODE])
def test_code(text, reason):
    assert verdict(CodeFilter()(text)) == (f"code:{reason}" if reason else None)


# --- Presets, chaining, configs -------------------------------------------------------------------

@pytest.fixture(scope="module")
def stdlib_files() -> list[str]:
    return [d.text for d in islice(python_src(), 40)]


def test_code_preset_keeps_python_source_that_web_drops(stdlib_files):
    code, web = build_filters("code"), build_filters("web")
    for text in stdlib_files:
        assert apply_filters(code, text) == FilterResult(True, text, None)
    web_results = [apply_filters(web, text) for text in stdlib_files]
    assert sum(r.keep for r in web_results) <= len(stdlib_files) // 10
    assert not any(r.keep and r.text == text for r, text in zip(web_results, stdlib_files,
                                                                strict=True))


def test_prose_preset_keeps_clean_prose():
    text = lines_of(plain(300))
    for preset in ("prose", "web"):
        assert apply_filters(build_filters(preset), text) == FilterResult(True, text, None)


def test_apply_filters_passes_modified_text_and_stops_at_first_drop():
    seen = []

    class Record:
        name = "record"

        def __call__(self, text: str) -> FilterResult:
            seen.append(text)
            return FilterResult(True, text, None)

    page = "\n".join([SENTENCE] * 2 + ["Menu", "Home"] + [SENTENCE])
    result = apply_filters([C4Filter(), Record()], page)
    assert seen == ["\n".join([SENTENCE] * 3)] and result.text == seen[0]
    dropped = apply_filters([C4Filter(), Record()], "Menu")
    assert dropped.reason == "c4:min_sentences" and len(seen) == 1


def test_presets_and_overrides():
    assert set(PRESETS) == {"web", "prose", "code"}
    assert [f.name for f in build_filters("web")] == list(PRESETS["web"])
    assert "c4" not in PRESETS["prose"]
    code = build_filters("code")[1].config
    assert code.max_dup_line_fraction == 0.6  # the code preset's relaxed limit
    overridden = build_filters("code", {"gopher_repetition": {"max_dup_line_fraction": "0.7"}})
    assert overridden[1].config.max_dup_line_fraction == 0.7  # YAML strings are coerced
    assert overridden[1].config.max_dup_line_char_fraction == 0.5  # preset default kept
    assert build_filters("web", {"c4": {"min_words_per_line": 3}})[0].config.min_words_per_line == 3


@pytest.mark.parametrize(("preset", "overrides", "message"), [
    ("nope", None, r"preset: 'nope' is not one of 'web', 'prose', 'code'"),
    ("web", {"gopher": {}}, r"unknown filter 'gopher'; known: gopher_quality"),
    ("prose", {"c4": {"min_sentences": 1}}, r"'c4' is not in preset 'prose'"),
    ("web", {"c4": {"min_sentence": 1}}, r"filters\.c4: overrides: unknown field 'min_sentence'"),
    ("web", {"c4": 3}, r"filters\.c4: expected a mapping"),
    ("web", {"fineweb": {"max_short_line_fraction": 1.5}},
     r"filters\.fineweb: max_short_line_fraction: must be a fraction in \[0, 1\], got 1\.5"),
    ("web", {"gopher_quality": {"min_words": "many"}},
     r"filters\.gopher_quality: overrides: min_words: expected int, got 'many'"),
    ("code", {"gopher_repetition": {"max_dup_ngram_char_fraction": [0.1]}},
     r"max_dup_ngram_char_fraction: expected 6 values \(n = 5\.\.10\), got 1"),
])
def test_bad_presets_and_overrides_name_the_field(preset, overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_filters(preset, overrides)


@pytest.mark.parametrize(("make", "message"), [
    (lambda: GopherQualityConfig(min_words=10, max_words=5), "max_words: 5 is below min_words"),
    (lambda: GopherQualityConfig(stop_words=[]), "stop_words: empty"),
    (lambda: C4Config(terminal_punctuation=[]), "terminal_punctuation"),
    (lambda: CodeConfig(min_alnum_fraction=-0.1), "min_alnum_fraction"),
    (lambda: FineWebConfig(short_line_length=-1), "short_line_length: must be >= 0"),
])
def test_invalid_configs(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_filters_pickle(preset, stdlib_files):
    filters = build_filters(preset, {"c4": {"bad_words": ["darn"]}} if preset == "web" else None)
    copies = pickle.loads(pickle.dumps(filters))
    docs = [*stdlib_files[:10], lines_of(plain(300)), "\n".join([SENTENCE] * 3)]
    assert [apply_filters(copies, d) for d in docs] == [apply_filters(filters, d) for d in docs]
