"""Evaluation: the shared-prefix scorer equals a full recomputation; rolling windows predict
each token once; MMLU and GSM8K prompts are lm-eval's, exactly, from fixtures in the published
formats (CSV/JSONL and the hub's Parquet); answer extraction and pass@k; HumanEval through the
real sandbox; ``lmforge eval`` writes every prediction and resumes where it stopped."""

from __future__ import annotations

import csv
import gzip
import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge.cli import main
from lmforge.errors import ConfigError, InputError
from lmforge.eval import EvalConfig, evaluate
from lmforge.eval.gsm8k import GSM8K, flexible_answer, normalize, strict_answer
from lmforge.eval.humaneval import HumanEval, pass_at_k
from lmforge.eval.mmlu import MMLU
from lmforge.eval.scoring import rolling_logprobs, score_requests
from lmforge.eval.task import Env
from lmforge.inference import SamplingParams, generate_batch

from .conftest import tiny_model

SUBJECTS = ("abstract_algebra", "high_school_biology")


def _full_logprob(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    ids = torch.tensor([context + continuation[:-1]])  # the last token is only a target
    with torch.no_grad():
        logp = F.log_softmax(model(ids)[0].float(), -1)
    rows = logp[len(context) - 1:len(context) + len(continuation) - 1]
    target = torch.tensor(continuation)
    return float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())


def test_shared_prefix_scores_equal_full_recomputation():
    model = tiny_model(context=64)
    g = random.Random(0)
    prefix = [g.randrange(97) for _ in range(20)]
    requests = [(prefix + [g.randrange(97) for _ in range(g.randint(1, 9))],
                 [g.randrange(97) for _ in range(g.randint(1, 4))]) for _ in range(11)]
    requests.append(([5, 6], [7]))  # shares nothing with the rest
    requests += [(requests[0][0], [t]) for t in (1, 2, 3)]  # one context, one-token answers
    got = score_requests(model, requests, batch_size=4)
    for (ctx, cont), score in zip(requests, got, strict=True):
        logprob, greedy = _full_logprob(model, ctx, cont)
        assert score.logprob == pytest.approx(logprob, abs=1e-4) and score.greedy == greedy
    # a greedy continuation is recognized as such
    ctx = requests[0][0]
    with torch.no_grad():
        best = int(model(torch.tensor([ctx]))[0, -1].argmax())
    assert score_requests(model, [(ctx, [best])])[0].greedy


def test_requests_longer_than_the_context_are_cut_from_the_left():
    model = tiny_model(context=16)
    ctx, cont = list(range(1, 30)), [3, 4]
    score = score_requests(model, [(ctx, cont)])[0]
    kept = (ctx + cont)[-17:]  # context + 1 tokens: 15 of context, then the continuation
    expected, _ = _full_logprob(model, kept[:-2], cont)
    assert score.logprob == pytest.approx(expected, abs=1e-4)


def test_rolling_windows_predict_every_token_once():
    model = tiny_model(context=16)
    ids = [random.Random(1).randrange(97) for _ in range(40)]
    logp = rolling_logprobs(model, ids)
    assert logp.shape == (39,)
    # the first window is one plain forward pass
    with torch.no_grad():
        first = F.log_softmax(model(torch.tensor([ids[:16]]))[0], -1)
    assert torch.allclose(logp[:16], first.gather(1, torch.tensor(ids[1:17])[:, None])[:, 0],
                          atol=1e-5)
    # a later token is predicted from the full context window before it
    with torch.no_grad():
        window = F.log_softmax(model(torch.tensor([ids[23:39]]))[0], -1)
    assert logp[38].item() == pytest.approx(window[-1, ids[39]].item(), abs=1e-5)


# ---------------------------------------------------------------------------- task fixtures


def _mmlu_row(i: int, subject: str) -> list[str]:
    return [f"  What is {i} in {subject}? ", f"a{i}", f"b{i}", f"c{i}", f"d{i}", "ABCD"[i % 4]]


@pytest.fixture(scope="module")
def task_data(tmp_path_factory) -> Path:
    """MMLU, GSM8K and HumanEval fixtures in their published formats."""
    root = tmp_path_factory.mktemp("task_data")
    for split, n in (("dev", 5), ("test", 3)):
        (root / "mmlu" / split).mkdir(parents=True)
        for subject in SUBJECTS:
            with open(root / "mmlu" / split / f"{subject}_{split}.csv", "w", newline="") as f:
                csv.writer(f).writerows(_mmlu_row(i + 10 * (split == "test"), subject)
                                        for i in range(n))
    (root / "gsm8k").mkdir()
    for split, n in (("train", 12), ("test", 4)):
        rows = [{"question": f"{split} question {i}?", "answer": f"{i} + 1 = <<{i}+1={i + 1}>>"
                 f"{i + 1}\n#### {i + 1}"} for i in range(n)]
        (root / "gsm8k" / f"{split}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows))
    (root / "humaneval").mkdir()
    problems = [{"task_id": f"HumanEval/{i}", "prompt": f"def add_{i}(x):\n",
                 "canonical_solution": f"    return x + {i}\n",
                 "test": f"def check(f):\n    assert f(1) == {1 + i}\n", "entry_point": f"add_{i}"}
                for i in range(3)]
    with gzip.open(root / "humaneval" / "HumanEval.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(p) + "\n" for p in problems)
    return root


def test_mmlu_prompt_is_lm_evals_exactly(task_data):
    task = MMLU(str(task_data), shots=2)
    examples = task.examples()
    assert [e["id"] for e in examples[:3]] == [f"abstract_algebra/{i}" for i in range(3)]
    assert examples[0]["context"] == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "What is 0 in abstract_algebra?\nA. a0\nB. b0\nC. c0\nD. d0\nAnswer: A\n\n"
        "What is 1 in abstract_algebra?\nA. a1\nB. b1\nC. c1\nD. d1\nAnswer: B\n\n"
        "What is 10 in abstract_algebra?\nA. a10\nB. b10\nC. c10\nD. d10\nAnswer:")
    zero = MMLU(str(task_data), shots=0).examples()[3]
    assert zero["context"] == ("The following are multiple choice questions (with answers) "
                               "about high school biology.\n\nWhat is 10 in high_school_biology?"
                               "\nA. a10\nB. b10\nC. c10\nD. d10\nAnswer:")
    assert examples[1]["answer"] == 3  # "D" for row 11


def test_the_hub_parquet_layout_reads_the_same(task_data, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    from lmforge.eval import data

    for split, hub in (("dev", "dev"), ("test", "test")):
        rows = data.mmlu(str(task_data), split)
        (tmp_path / "mmlu" / "all").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows),
                       tmp_path / "mmlu" / "all" / f"{hub}-00000-of-00001.parquet")
    for split in ("train", "test"):
        (tmp_path / "gsm8k" / "main").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(data.gsm8k(str(task_data), split)),
                       tmp_path / "gsm8k" / "main" / f"{split}-00000-of-00001.parquet")
    assert MMLU(str(tmp_path)).examples() == MMLU(str(task_data)).examples()
    assert GSM8K(str(tmp_path)).examples() == GSM8K(str(task_data)).examples()


def test_missing_task_data_and_offline_hub_fail_at_once(task_data, tmp_path, monkeypatch):
    with pytest.raises(InputError, match="no humaneval data here"):
        HumanEval(str(tmp_path)).examples()

    def offline(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr("socket.create_connection", offline)
    with pytest.raises(InputError, match=r"cannot reach huggingface\.co"):
        MMLU("hub").examples()
    with pytest.raises(ConfigError, match="task_data"):
        from lmforge.eval.run import build_tasks

        build_tasks(EvalConfig(checkpoint="x", tasks=["mmlu"]), None)


def test_gsm8k_prompt_fewshot_draw_and_extraction(task_data):
    task = GSM8K(str(task_data), shots=2)
    examples = task.examples()
    train = [json.loads(line) for line in (task_data / "gsm8k" / "train.jsonl").open()]
    rnd = random.Random(1234)  # lm-eval's sampler: one generator, drawn per question in order
    for ex in examples:
        assert ex["shots"] == [(s["question"], s["answer"]) for s in rnd.sample(train, 2)]
    q0, a0 = examples[0]["shots"][0]
    assert task.context(examples[0]).startswith(f"Question: {q0}\nAnswer: {a0}\n\n")
    assert task.context(examples[0]).endswith("Question: test question 0?\nAnswer:")
    first = GSM8K(str(task_data), shots=2, sampler="first").examples()
    assert first[3]["shots"] == [(t["question"], t["answer"]) for t in train[:2]]

    text = "She has 3 + 4 = 7 apples.\n#### 1,234.\nQuestion: next"
    assert strict_answer(text) == "1,234."
    assert flexible_answer("so $1,234.50 then 12 and 7.") == "7."
    assert flexible_answer("no numbers") == strict_answer("no numbers") == "[invalid]"
    assert normalize("1,234.") == normalize("step\n#### 1234") == "1234"
    assert normalize("$5") == "5"


def test_pass_at_k_is_the_unbiased_estimator():
    for n, c, k in [(10, 0, 1), (10, 3, 1), (10, 3, 5), (20, 19, 10), (5, 5, 5), (200, 7, 100)]:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-9, abs=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


class Canonical(Env):
    """An Env whose 'model' writes each problem's canonical solution (or a wrong one): the
    sandbox, not the model, is what this test exercises."""

    def __init__(self, problems: dict[str, str], wrong: set[str]) -> None:
        self.problems, self.wrong = problems, wrong
        self.tokenizer = type("T", (), {"encode": staticmethod(lambda s: s)})()

    def generate(self, prompts, params, until):
        return ["    return None\n" if p in self.wrong else self.problems[p] for p in prompts]


def test_humaneval_runs_completions_in_the_sandbox(task_data):
    task = HumanEval(str(task_data))
    examples = task.examples()
    solutions = {}
    with gzip.open(task_data / "humaneval" / "HumanEval.jsonl.gz", "rt") as f:
        for line in f:
            p = json.loads(line)
            solutions[p["prompt"]] = p["canonical_solution"]
    env = Canonical(solutions, wrong={examples[1]["prompt"]})
    predictions = task.run(env, examples)
    assert [p["passed"] for p in predictions] == [1, 0, 1]
    assert task.metrics(predictions)["pass@1"] == pytest.approx(2 / 3)


def test_generate_batch_rows_end_on_their_own_hook():
    model = tiny_model()
    prompts = [[1, 2], [3, 4, 5]]
    full = generate_batch(model, prompts, SamplingParams.greedy(10))
    cut = generate_batch(model, prompts, SamplingParams.greedy(10),
                         finished=lambda row, ids: row == 0 and len(ids) == 3)
    assert cut[0] == full[0][:3] and cut[1] == full[1]


def test_generation_keeps_shared_prefixes_shared(tokenizer, monkeypatch):
    """Questions after the same few-shot examples share their keys and values even when
    another prompt is too long and is cut from the left (losing the examples): it runs apart.
    Two prompts sampled three times each: each prompt's samples share it. Two rows at a time,
    every text is what its prompt gets alone."""
    from lmforge.inference import engine

    model = tiny_model(vocab_size=tokenizer.vocab_size, context=64)
    shared: list[int] = []
    real = engine._prefill_shared
    monkeypatch.setattr(engine, "_prefill_shared",
                        lambda m, cache, p: (shared.append(len(p)), real(m, cache, p)))
    examples = list(range(100, 120))
    prompts = [[*examples, 5, 6], list(range(200, 260)), [*examples, 7, 8, 9], [*examples, 10]]
    env = Env(model, tokenizer, batch_size=2)
    texts = env.generate(prompts, SamplingParams.greedy(16), ("zz",))
    assert shared == [20]  # one group shared the examples; the cut prompt ran alone
    for prompt, text in zip(prompts, texts, strict=True):
        alone = Env(model, tokenizer, batch_size=1).generate([prompt], SamplingParams.greedy(16),
                                                             ("zz",))
        assert text == alone[0]
    assert shared == [20]
    shared.clear()
    twice = [list(range(300, 330)), list(range(400, 425))]
    texts = env.generate([p for p in twice for _ in range(3)], SamplingParams.greedy(8), ("zz",))
    assert sorted(shared) == [24, 29]  # all but the last token, once per prompt
    assert texts == [t for p in twice
                     for t in Env(model, tokenizer, batch_size=1).generate(
                         [p], SamplingParams.greedy(8), ("zz",)) * 3]


# ---------------------------------------------------------------------------- end to end


def test_eval_writes_every_prediction_and_resumes(trained_run, task_data, tmp_path,
                                                  monkeypatch, capsys):
    out = tmp_path / "ev"
    config = dict(checkpoint=str(trained_run), tasks=["bpb", "mmlu", "gsm8k"],
                  task_data=str(task_data), out=str(out), max_new_tokens=8, progress=False,
                  shots=1)
    calls = {"n": 0}
    real = MMLU.run

    def interrupted(self, env, examples):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, env, examples)

    monkeypatch.setattr("lmforge.eval.run.CHUNK", {"bpb": 8, "mmlu": 2, "gsm8k": 2})
    monkeypatch.setattr(MMLU, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate(EvalConfig(**config))
    partial = (out / "partial" / "mmlu.jsonl").read_text().splitlines()
    assert len(partial) == 3  # the settings line and the first chunk's two predictions
    calls["n"] = 10
    monkeypatch.setattr(MMLU, "run", lambda self, env, ex: (calls.__setitem__("seen", len(ex))
                                                            or real(self, env, ex)))
    report = evaluate(EvalConfig(**config))
    assert calls["seen"] == 2  # the last chunk of 6: the first two were not recomputed
    mmlu = report["tasks"]["mmlu"]
    assert mmlu["n"] == 6 and len(mmlu["predictions"]) == 6 and mmlu["chance"] == 0.25
    assert all(len(p["logprobs"]) == 4 for p in mmlu["predictions"])
    assert set(mmlu["metrics"]["subjects"]) == set(SUBJECTS)
    gsm = report["tasks"]["gsm8k"]["predictions"]
    assert len(gsm) == 4 and all({"generated", "strict", "flexible"} <= set(p) for p in gsm)
    bpb = report["tasks"]["bpb"]["metrics"]
    assert 0 < bpb["bpb"] < 8 and bpb["perplexity"] > 1
    saved = json.loads((out / "eval.json").read_text())
    assert saved["tasks"]["mmlu"]["predictions"] == mmlu["predictions"]

    with pytest.raises(InputError, match="other settings; pass --force"):
        evaluate(EvalConfig(**{**config, "shots": 0}))
    assert main(["eval", "--checkpoint", str(trained_run), "--tasks", "mmlu", "--task-data",
                 str(task_data), "--out", str(out), "--shots", "0", "--force",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "mmlu" in printed and "acc" in printed and "0.25" in printed


def test_chat_variants_prompt_in_the_chat_template(task_data, tokenizer):
    from lmforge.tokenizer import Message, render_chat

    class Recording(Env):
        def score(self, requests):
            self.requests = list(requests)
            return super().score(requests)

        def generate(self, prompts, params, until):
            self.prompts, self.until = prompts, until
            return ["#### 1"] * len(prompts)

    env = Recording(tiny_model(vocab_size=tokenizer.vocab_size, context=512), tokenizer)
    mmlu = MMLU(str(task_data), shots=1, chat=True)
    example = mmlu.examples()[0]
    prediction = mmlu.run(env, [example])[0]
    context = render_chat(tokenizer, [Message("user", example["context"])])
    assert [r[0] for r in env.requests] == [context] * 4  # ends with the assistant marker
    assert [r[1] for r in env.requests] == [tokenizer.encode(x) for x in "ABCD"]
    assert len(prediction["logprobs"]) == 4
    gsm = GSM8K(str(task_data), shots=1, chat=True)
    example = gsm.examples()[0]
    gsm.run(env, [example])
    (q, a), = example["shots"]
    assert env.prompts == [render_chat(tokenizer, [
        Message("user", f"Question: {q}"), Message("assistant", a),
        Message("user", f"Question: {example['question']}")])]
    assert "<|end|>" in env.until
