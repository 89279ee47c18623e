"""lm-evaluation-harness parity, offline, on one small model exported as a Hugging Face directory:
lmforge's own MMLU and GSM8K equal lm-eval's ``hf`` backend running lm-eval's task definitions
(the same choices, texts, extracted answers and scores), and lm-eval through
:class:`~lmforge.eval.harness.LmforgeLM` (:func:`~lmforge.eval.harness.run_harness`) equals lm-eval
through ``hf`` sample by sample, on MMLU, GSM8K and three small tasks of the test's own for the
request kinds those two leave out (rolling log-likelihood, an empty context, stop strings hit
mid-batch). Task files are written here in the published formats; lm-eval reads them through
:func:`~lmforge.eval.harness.write_local_tasks`."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmforge.errors import ConfigError
from lmforge.eval import EvalConfig, evaluate
from lmforge.inference import SamplingParams

from .conftest import tiny_model

SUBJECTS = ("college_mathematics", "high_school_biology")
NAMES = ("Ann", "Ben", "Cal", "Dee", "Eve", "Fay")
EXTRA_TASKS = ("rolling_text", "empty_context", "stop_strings")  # written by _extra_tasks


def _gsm8k_row(i: int) -> dict[str, str]:
    a, b, c = 3 + 7 * i % 40, 2 + 5 * i % 30, 1 + i % 9
    name = NAMES[i % len(NAMES)]
    return {"question": f"{name} has {a} pens and buys {b} more, then gives {c} away. How many "
                        f"pens does {name} have?",
            "answer": f"{name} has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} pens.\nThen "
                      f"{a + b} - {c} = <<{a + b}-{c}={a + b - c}>>{a + b - c}.\n#### "
                      f"{a + b - c:,}"}


def _mmlu_row(i: int, subject: str) -> list[str]:
    a, b = 2 + i, 11 + 3 * i
    choices = [str(a + b), str(a * b), "None", f"{a - b}.50"]
    k = i % 4
    choices[0], choices[k] = choices[k], choices[0]
    return [f" In {subject}, what is {a} plus {b}? ", *choices, "ABCD"[k]]


def _write_task_data(root: Path) -> list[str]:
    """MMLU CSVs and GSM8K JSONL in the layout of ../shared/data; returns their texts."""
    texts = []
    for split, n in (("dev", 5), ("test", 3)):
        (root / "mmlu" / split).mkdir(parents=True)
        for subject in SUBJECTS:
            rows = [_mmlu_row(i + 5 * (split == "test"), subject) for i in range(n)]
            with open(root / "mmlu" / split / f"{subject}_{split}.csv", "w", newline="") as f:
                csv.writer(f).writerows(rows)
            texts += [" ".join(r) for r in rows]
    (root / "gsm8k").mkdir()
    for split, n in (("train", 12), ("test", 4)):
        rows = [_gsm8k_row(i + 20 * (split == "test")) for i in range(n)]
        (root / "gsm8k" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n"
                                                               for r in rows))
        texts += [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows]
    return texts


def _extra_tasks(out: Path) -> None:
    """Tasks whose requests MMLU and GSM8K do not make: a rolling log-likelihood of texts longer
    than the model's context, choices scored after an empty context, generation ended by stop
    strings that each row meets at a different step."""
    rows = [_gsm8k_row(i) for i in range(40)]
    texts = [{"text": " ".join(r["answer"] for r in rows[:k])} for k in (1, 12, 40)]
    choices = [{"choices": [r["question"][:12], r["answer"][:9], " the", "\n"], "answer": i % 4}
               for i, r in enumerate(rows[:6])]
    prompts = [{"question": r["question"], "answer": r["answer"]} for r in rows[:6]]
    common = {"test_split": "test", "num_fewshot": 0, "metadata": {"version": 1}}
    for name, records, config in (
            ("rolling_text", texts, {
                "output_type": "loglikelihood_rolling", "doc_to_text": "",
                "doc_to_target": "{{text}}",
                "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity",
                                                        "bits_per_byte")]}),
            ("empty_context", choices, {
                "output_type": "multiple_choice", "doc_to_text": "",
                "doc_to_choice": "{{choices}}", "doc_to_target": "answer",
                "metric_list": [{"metric": "acc"}]}),
            ("stop_strings", prompts, {
                "output_type": "generate_until", "doc_to_text": "{{question}}",
                "doc_to_target": "{{answer}}", "metric_list": [{"metric": "exact_match"}],
                "generation_kwargs": {"until": ["e", " t"], "do_sample": False,
                                      "max_gen_toks": 24}})):
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        (out / f"{name}.yaml").write_text(yaml.safe_dump({
            "task": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(path)},
                               "cache_dir": str(out / "hf-datasets-cache")},
            **common, **config}))


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Any]:
    """Task data, the extra tasks, and a seeded model with a tokenizer trained on the task texts,
    exported as a Hugging Face directory that both sides read (``hf``). lmforge's own tasks keep
    special tokens in the text they generate where lm-eval's hf backend drops them: this model
    emits none but ``<|endoftext|>``; ``hf-specials`` is the same model emitting them all."""
    import torch

    from lmforge.export.hf import export_hf
    from lmforge.tokenizer import ENDOFTEXT, Tokenizer

    root = tmp_path_factory.mktemp("harness")
    texts = _write_task_data(root / "data")
    (root / "extra").mkdir()
    _extra_tasks(root / "extra")
    tok = Tokenizer.train(texts, 400, workers=1, show_progress=False)
    model = tiny_model(context=512, vocab_size=tok.vocab_size)
    export_hf(model, tok, root / "hf-specials")
    with torch.no_grad():  # tied embeddings: a zero row is a zero logit, never the largest
        for name, i in tok.special_tokens.items():
            if name != ENDOFTEXT:
                model.embed_tokens.weight[i] = 0
    export_hf(model, tok, root / "hf")
    return {"root": root, "data": str(root / "data"), "hf": str(root / "hf")}


@pytest.fixture(scope="module")
def lm_eval_env(setup):
    """lm-eval importable, and kept offline (everything it reads is a local path)."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            mp.setenv(name, "1")
        mp.setenv("HF_HOME", str(setup["root"] / "hf-home"))
        pytest.importorskip("lm_eval.models.huggingface",
                            reason="needs lm-eval and its hf backend: pip install 'lmforge[eval]'")
        yield


@pytest.fixture(scope="module")
def ours(setup) -> dict[str, Any]:
    """lmforge's own tasks: predictions by id."""
    report = evaluate(EvalConfig(checkpoint=setup["hf"], tasks=["mmlu", "gsm8k"],
                                 task_data=setup["data"], out=str(setup["root"] / "ours"),
                                 batch_size=4, progress=False))
    return {name: {p["id"]: p for p in task["predictions"]} | {"metrics": task["metrics"]}
            for name, task in report["tasks"].items()}


@pytest.fixture(scope="module")
def via_hf(setup, lm_eval_env) -> dict[str, Any]:
    """lm-eval's hf backend on the exported directory, all tasks, 5 shots as lmforge's."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from lmforge.eval.harness import write_local_tasks

    local = setup["root"] / "local-tasks"
    write_local_tasks(setup["data"], local, ["mmlu", "gsm8k"])
    return lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={setup['hf']},dtype=float32", batch_size=4,
        device="cpu", tasks=["mmlu_local", "gsm8k_local", *EXTRA_TASKS], num_fewshot=5,
        task_manager=TaskManager(include_path=[str(local), str(setup["root"] / "extra")]),
        log_samples=True)


@pytest.fixture(scope="module")
def via_lmforge(setup, lm_eval_env) -> dict[str, Any]:
    """The same tasks through run_harness: lm-eval on lmforge's engine."""
    from lmforge.eval.harness import run_harness

    return run_harness(setup["hf"], ["mmlu_local", "gsm8k_local", *EXTRA_TASKS], num_fewshot=5,
                       include_path=str(setup["root"] / "extra"), task_data=setup["data"],
                       batch_size=3, device="cpu", out=str(setup["root"] / "harness"))


def _samples(results: dict[str, Any], task: str) -> dict[tuple[int, str], dict[str, Any]]:
    return {(s["doc_id"], s["filter"]): s for s in results["samples"][task]}


def _same(got: Any, want: Any) -> bool:
    """Equal, log-likelihoods (floats, however nested) within float32 noise."""
    if isinstance(want, list | tuple):
        return len(got) == len(want) and all(map(_same, got, want))
    if isinstance(want, float):
        return got == pytest.approx(want, abs=2e-4, rel=1e-5)
    return got == want


def test_mmlu_choices_and_scores_equal_lm_evals_hf_backend(ours, via_hf):
    for subject in SUBJECTS:
        for (doc_id, _), sample in _samples(via_hf, f"mmlu_local_{subject}").items():
            mine = ours["mmlu"][f"{subject}/{doc_id}"]
            theirs = [resp[0][0] for resp in sample["resps"]]  # one (logprob, greedy) per choice
            assert mine["logprobs"] == pytest.approx(theirs, abs=2e-4)
            assert mine["pred"] == max(range(4), key=theirs.__getitem__)
            assert mine["correct"] == bool(sample["acc"])
    assert ours["mmlu"]["metrics"]["acc"] == pytest.approx(
        via_hf["groups"]["mmlu_local"]["acc,none"])


def test_gsm8k_generations_and_answers_equal_lm_evals_hf_backend(ours, via_hf):
    samples = _samples(via_hf, "gsm8k_local")
    for (doc_id, filter_name), sample in samples.items():
        mine = ours["gsm8k"][str(doc_id)]
        assert mine["generated"] == sample["resps"][0][0]
        key = {"strict-match": "strict", "flexible-extract": "flexible"}[filter_name]
        assert mine[key] == sample["filtered_resps"][0]
    result = via_hf["results"]["gsm8k_local"]
    assert ours["gsm8k"]["metrics"]["exact_match_strict"] == result["exact_match,strict-match"]
    assert ours["gsm8k"]["metrics"]["exact_match_flexible"] == pytest.approx(
        result["exact_match,flexible-extract"])


@pytest.mark.parametrize("task", [*(f"mmlu_local_{s}" for s in SUBJECTS), "gsm8k_local",
                                  *EXTRA_TASKS])
def test_lm_eval_through_lmforge_equals_its_hf_backend(via_lmforge, via_hf, task):
    mine, theirs = _samples(via_lmforge, task), _samples(via_hf, task)
    assert mine.keys() == theirs.keys()
    for key, sample in theirs.items():
        for field in ("arguments", "resps", "filtered_resps"):
            assert _same(mine[key][field], sample[field]), (key, field)
    for metric, value in via_hf["results"][task].items():
        if isinstance(value, float) and not math.isnan(value) and "stderr" not in metric:
            assert via_lmforge["results"][task][metric] == pytest.approx(value, rel=1e-4)


def test_run_harness_writes_its_results(via_lmforge):
    from lmforge.eval.harness import table

    written = json.loads(Path(via_lmforge["out"]).read_text())
    assert written["results"]["gsm8k_local"] == json.loads(json.dumps(
        via_lmforge["results"]["gsm8k_local"]))
    assert written["config"]["model"] == "LmforgeLM"
    assert written["config"]["model_source"].startswith("Hugging Face model directory")
    assert "|mmlu_local" in table(via_lmforge).replace(" ", "")  # the groups' table too


def test_run_harness_refuses_unknown_tasks_and_missing_data(setup, lm_eval_env):
    from lmforge.eval.harness import run_harness

    with pytest.raises(ConfigError, match="--task-data"):
        run_harness(setup["hf"], ["gsm8k_local"])
    with pytest.raises(ConfigError, match="no lm-eval task no_such_task"):
        run_harness(setup["hf"], ["no_such_task"])


def test_stop_strings_cut_some_generations(via_hf):
    texts = [s["resps"][0][0] for s in via_hf["samples"]["stop_strings"]]
    assert len({len(t) for t in texts}) > 2, texts  # rows of one batch ended at different steps


def test_generated_text_drops_special_tokens_as_hf_does(setup, lm_eval_env):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from lmforge.eval.harness import LmforgeLM

    path = str(setup["root"] / "hf-specials")
    prompts = [_gsm8k_row(i)["question"] for i in range(4)]
    requests = [Instance("generate_until", {}, (p, {"until": ["Question:"], "max_gen_toks": 48}),
                         i) for i, p in enumerate(prompts)]
    theirs = HFLM(pretrained=path, dtype="float32", batch_size=2, device="cpu").generate_until(
        requests)
    lm = LmforgeLM(path, batch_size=2)
    assert lm.generate_until(requests) == theirs
    raw = lm.env.generate([lm.tokenizer.encode(p) for p in prompts], SamplingParams.greedy(48),
                          ["Question:"])
    assert any("<|pad|>" in text for text in raw)  # what was dropped


def test_the_model_is_registered_beside_lm_evals_own(lm_eval_env):
    from lm_eval.api.registry import get_model

    from lmforge.eval.harness import LmforgeLM

    assert get_model("lmforge") is LmforgeLM
    assert get_model("hf").__name__ == "HFLM"


def test_lm_evals_command_line_runs_with_the_model_registered(setup, lm_eval_env):
    import os
    import subprocess

    out = subprocess.run(
        [sys.executable, "-m", "lmforge.eval.harness", "--model", "lmforge", "--model_args",
         f"pretrained={setup['hf']}", "--tasks", "empty_context", "--include_path",
         str(setup["root"] / "extra"), "--limit", "2", "--batch_size", "2"],
        capture_output=True, text=True, env=os.environ, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "|empty_context|" in out.stdout.replace(" ", "")


def test_prefix_groups_share_each_subjects_prompt():
    pytest.importorskip("lm_eval")
    from lmforge.eval.harness import prefix_groups

    a, b = [1] * 50, [2] * 50  # two subjects' descriptions and examples
    contexts = [[*a, 7, i] for i in range(3)] + [[*b, i] for i in range(2)] + [[*a, 7, 0]]
    groups = prefix_groups(contexts)
    assert sorted(map(sorted, groups)) == [[0, 1, 2, 5], [3, 4]]
    unrelated = [[i, i + 1] for i in range(5)]
    assert len(prefix_groups(unrelated)) == 1  # nothing to share: one batch


def test_generation_kwargs_become_sampling_params():
    pytest.importorskip("lm_eval")
    from lmforge.eval.harness import sampling

    params, until = sampling({"until": ["Question:"], "do_sample": False, "temperature": 0.0})
    assert params.temperature == 0 and params.max_new_tokens == 256
    assert until == ["Question:", "<|endoftext|>"]
    params, _ = sampling({"until": "\n", "temperature": 0.7, "top_p": 0.9, "max_gen_toks": 9})
    assert (params.temperature, params.top_p, params.top_k, params.max_new_tokens) == (
        0.7, 0.9, None, 9)
    with pytest.raises(ConfigError, match="num_beams"):
        sampling({"do_sample": True, "temperature": 1.0, "num_beams": 4})


def test_without_lm_eval_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now fails
    monkeypatch.delitem(sys.modules, "lmforge.eval.harness", raising=False)
    with pytest.raises(ConfigError, match=r"pip install 'lmforge\[eval\]'"):
        import lmforge.eval.harness  # noqa: F401

