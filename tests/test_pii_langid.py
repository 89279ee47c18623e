"""PII masking, the language filter, and both in ``lmforge data prepare``."""

from __future__ import annotations

import json
import pickle
import random
import sys

import pytest

from lmforge.data import langid
from lmforge.data.filters import FILTERS, GopherQualityFilter, apply_filters
from lmforge.data.langid import LanguageConfig, LanguageFilter, identify
from lmforge.data.pii import EMAIL, IP, PHONE, mask_pii
from lmforge.data.pipeline import DataConfig, prepare
from lmforge.data.shards import Shard
from lmforge.errors import ConfigError
from lmforge.tokenizer import ENDOFTEXT, Tokenizer

# --- PII ------------------------------------------------------------------------------------------

EMAILS = ["jane@example.com", "john.doe+newsletter@mail.example.co.uk", "a_b-c%d@sub.domain.org",
          "X.Y@EXAMPLE.IO", "o'brien@example.ie", "user123@server-01.example.net"]
PHONES = ["(555) 123-4567", "(555)123-4567", "555-123-4567", "555.123.4567", "555 123 4567",
          "1-555-123-4567", "+1 555 123 4567", "+1 (555) 123-4567", "+44 20 7946 0958",
          "+44 (0)20 7946 0958", "+33 1 23 45 67 89", "+49 30 901820", "+81-3-1234-5678"]
IPS = ["192.168.0.1", "10.0.0.255", "8.8.8.8", "255.255.255.255", "1.2.3.4",
       "2001:db8::1", "fe80::1", "2001:0db8:85a3:0000:0000:8a2e:0370:7334",
       "2001:db8:85a3::8a2e:370:7334", "2001:DB8::", "FE80::0202:B3FF:FE1E:8329"]
NOT_PII = ["2024-01-01", "3.14159", "5551234567", "in 1999 and 2024", "ID 123456789012",
           "v1.2.3", "1.2.3.4.5", "256.1.1.1", "01.02.03.04", "12:30:45", "00:1a:2b:3c:4d:5e",
           "::1", "::", "x[::2]", "std::vector", "2 + 2 = 4", "+12 34", "ISBN 978-3-16-148410-0",
           "user at example dot com", "@handle", "name@localhost", "a@b", "100-200-3000",
           "|||EMAIL_ADDRESS||| |||PHONE_NUMBER||| |||IP_ADDRESS|||"]


@pytest.mark.parametrize(("values", "placeholder", "kind"),
                         [(EMAILS, EMAIL, "EMAIL_ADDRESS"), (PHONES, PHONE, "PHONE_NUMBER"),
                          (IPS, IP, "IP_ADDRESS")])
def test_pii_is_masked_in_running_text(values, placeholder, kind):
    for value in values:
        for template in ("{}", "Contact: {}.", "({})", "at {}, or", "<{}>"):
            text = template.format(value)
            masked, counts = mask_pii(text)
            assert masked == template.format(placeholder), text
            assert counts == {kind: 1}, text


@pytest.mark.parametrize("text", NOT_PII)
def test_non_pii_is_left_alone(text):
    assert mask_pii(text) == (text, {})
    assert mask_pii(f"See {text}, then stop.")[0] == f"See {text}, then stop."


def test_pii_counts_per_type_and_idempotence():
    text = ("Mail jane@example.com or bob@example.org, call +44 20 7946 0958 or 555-123-4567 "
            "or (555) 987-6543; server 10.0.0.1 and 2001:db8::1, mapped ::ffff:192.0.2.1.")
    masked, counts = mask_pii(text)
    assert counts == {"EMAIL_ADDRESS": 2, "PHONE_NUMBER": 3, "IP_ADDRESS": 3}
    assert masked == (f"Mail {EMAIL} or {EMAIL}, call {PHONE} or {PHONE} or {PHONE}; server {IP} "
                      f"and {IP}, mapped ::ffff:{IP}.")
    assert mask_pii(masked) == (masked, {})


# --- language identification ----------------------------------------------------------------------

SENTENCES = {
    "en": "The committee will publish its report on the new railway line next month, after the "
          "public consultation has closed.",
    "fr": "Le comité publiera son rapport sur la nouvelle ligne de chemin de fer le mois prochain, "
          "après la fin de la consultation publique.",
    "de": "Der Ausschuss wird seinen Bericht über die neue Eisenbahnlinie im nächsten Monat "
          "veröffentlichen, nachdem die öffentliche Anhörung abgeschlossen ist.",
    "es": "El comité publicará su informe sobre la nueva línea de ferrocarril el próximo mes, "
          "después de que haya terminado la consulta pública.",
}


@pytest.mark.parametrize("language", sorted(SENTENCES))
def test_languages_are_identified_confidently(language):
    detected, probability = identify(SENTENCES[language])
    assert detected == language
    assert probability >= LanguageConfig().threshold


def test_language_filter_keeps_chosen_languages_and_reports_them():
    f = LanguageFilter(LanguageConfig(keep=["en", "de"]))
    verdicts = {lang: f(text) for lang, text in SENTENCES.items()}
    assert {lang for lang, r in verdicts.items() if r.keep} == {"en", "de"}
    assert {lang: r.language for lang, r in verdicts.items()} == {lang: lang for lang in SENTENCES}
    assert verdicts["fr"].reason == "language:keep"
    assert verdicts["en"].text == SENTENCES["en"] and verdicts["en"].reason is None


def test_low_confidence_is_dropped():
    result = LanguageFilter()("12345 6789 0000")
    assert not result.keep and result.reason == "language:threshold"
    strict = LanguageFilter(LanguageConfig(threshold=1.0))
    assert strict(SENTENCES["en"]).reason == "language:threshold"


def test_language_survives_a_later_drop_in_the_chain():
    result = apply_filters([LanguageFilter(), GopherQualityFilter()], SENTENCES["en"])
    assert (result.keep, result.reason, result.language) == (False, "gopher_quality:min_words",
                                                             "en")
    assert apply_filters([GopherQualityFilter()], SENTENCES["en"]).language is None


def test_language_config_is_checked_and_the_filter_pickles():
    assert FILTERS["language"] == (LanguageFilter, LanguageConfig)
    for bad in ({"keep": []}, {"keep": ["English"]}, {"threshold": 1.5}):
        with pytest.raises(ConfigError):
            LanguageConfig(**bad)
    with pytest.raises(ConfigError, match="does not know"):
        LanguageFilter(LanguageConfig(keep=["qq"]))
    f = pickle.loads(pickle.dumps(LanguageFilter(LanguageConfig(keep=["fr"]))))
    assert f(SENTENCES["fr"]).keep


def test_missing_py3langid_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "py3langid.langid", None)
    langid._identifier.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"pip install 'lmforge\[scale\]'"):
            identify("hello")
    finally:
        monkeypatch.undo()
        langid._identifier.cache_clear()


# --- the pipeline ---------------------------------------------------------------------------------

WORDS = ["the", "of", "and", "to", "in", "that", "have", "with", "river", "stone", "light",
         "garden", "winter", "morning", "letter", "music", "city", "forest", "harbor", "window",
         "evening", "question", "answer", "story", "history", "science", "market", "road"]


def english(rng: random.Random) -> str:
    sentences = [" ".join(rng.choices(WORDS, k=12)).capitalize() + "." for _ in range(8)]
    return " ".join(sentences)


def test_prepare_masks_pii_and_keeps_chosen_languages(tmp_path):
    rng = random.Random(0)
    pii = ("Write to jane.doe@example.com or call (555) 123-4567 from the host at "
           "192.168.0.1 in the city.")
    docs = [english(rng) + " " + pii for _ in range(6)]
    foreign = {lang: [f"{text} {text.replace(',', ';')} ({i})" for i in range(2)]
               for lang, text in SENTENCES.items() if lang != "en"}
    rows = docs + [t for texts in foreign.values() for t in texts] + ["12345 6789"]
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    tok_path = tmp_path / "tok.json"
    Tokenizer.train(rows, 400, workers=1, show_progress=False).save(tok_path)

    manifest = prepare(DataConfig(input=[str(corpus)], tokenizer=str(tok_path),
                                  out=str(tmp_path / "out"), preset="prose", languages=["en"],
                                  mask_pii=True, filters={"language": {"threshold": 0.3}},
                                  val_fraction=0.0, workers=1, chunk_documents=4,
                                  progress=False))
    stats = manifest["stats"]
    assert stats["pii"] == {"EMAIL_ADDRESS": 6, "PHONE_NUMBER": 6, "IP_ADDRESS": 6}
    assert stats["languages"]["en"] == {"kept": 6, "dropped": 0}
    for lang in foreign:
        assert stats["languages"][lang] == {"kept": 0, "dropped": 2}
    assert stats["filters"]["language"] == 7  # 6 foreign, 1 below the threshold
    assert manifest["num_documents"] == 6

    tok = Tokenizer.load(tok_path)
    eot = tok.special_tokens[ENDOFTEXT]
    shard = Shard(tmp_path / "out" / manifest["shards"][0]["path"])
    texts = [tok.decode([t for t in shard.document(i).tolist() if t != eot])
             for i in range(shard.num_documents)]
    masked = f"Write to {EMAIL} or call {PHONE} from the host at {IP} in the city."
    assert sorted(texts) == sorted(d.replace(pii, masked) for d in docs)


def test_pipeline_language_options_are_checked(tmp_path):
    base = dict(input=["x.jsonl"], tokenizer="tok.json", out=str(tmp_path))
    with pytest.raises(ConfigError, match="set languages"):
        DataConfig(**base, filters={"language": {"threshold": 0.9}})
    with pytest.raises(ConfigError, match="threshold"):
        DataConfig(**base, languages=["en"], filters={"language": {"threshold": 2}})
    with pytest.raises(ConfigError, match="keep"):
        DataConfig(**base, languages=["English"])
    filters = DataConfig(**base, languages=["en", "fr"], preset="code").build_filters()
    assert [f.name for f in filters] == ["language", "code", "gopher_repetition"]
    assert filters[0].config.keep == ["en", "fr"]
