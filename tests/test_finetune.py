"""The fine-tuning stages end to end, on the tiny pretrained run: SFT (full and LoRA) learns and
its run opens like any other; an interrupted SFT run resumes bit for bit; DPO with LoRA keeps no
second model copy and starts at ln 2; one GRPO step samples, rewards and saves; the batch source
and rollout targets of GRPO; the CLI's one-line refusals."""

from __future__ import annotations

import json
import math
import os
import random
import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import lmforge
import lmforge.finetune.run as finetune_run
from lmforge.cli import main
from lmforge.data.chat_batches import SFTBatches, pad_id_of, render_examples
from lmforge.errors import InputError, TrainingInterrupted
from lmforge.finetune.config import DPOConfig, GRPOConfig, SFTConfig
from lmforge.finetune.dpo import finetune_dpo
from lmforge.finetune.grpo import QuestionBatches, finetune_grpo, questions_of, rollout_batch
from lmforge.finetune.lora import LoraLinear, load_adapter, lora_modules
from lmforge.finetune.run import ADAPTER_FILE, conversation_rows, read_split
from lmforge.finetune.sft import chat_reply, finetune_sft, held_out_loss
from lmforge.inference import SamplingParams
from lmforge.loading import open_model
from lmforge.rundir import RunDir
from lmforge.tokenizer import ENDOFTEXT
from lmforge.tokenizer.chat import END, Message, render_chat
from lmforge.train.checkpoint import Checkpoints, load_checkpoint
from lmforge.train.metrics import read_metrics

from .test_hardening import one_line_error

# every run: on the CPU in float32 (bit-exact comparisons), no progress bar, every step logged
COMMON = dict(device="cpu", dtype="fp32", progress=False, log_every=1)


# ------------------------------------------------------------------------------- fixtures


def _write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _sums(n: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(0, 4), rng.randint(0, 4)) for _ in range(n)]


def chat_rows(n: int = 40, seed: int = 0) -> list[dict[str, Any]]:
    """"add a and b" → "a+b": a one-digit reply and its <|end|>, quick to learn."""
    return [{"messages": [{"role": "user", "content": f"add {a} and {b}"},
                          {"role": "assistant", "content": str(a + b)}]}
            for a, b in _sums(n, seed)]


def preference_rows(n: int = 24, seed: int = 1) -> list[dict[str, Any]]:
    return [{"prompt": f"add {a} and {b}", "chosen": str(a + b), "rejected": str(a + b + 1)}
            for a, b in _sums(n, seed)]


def gsm8k_rows(n: int = 8, seed: int = 2) -> list[dict[str, Any]]:
    return [{"question": f"{a}+{b}?", "answer": f"{a}+{b}={a + b}\n#### {a + b}"}
            for a, b in _sums(n, seed)]


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    return _write_jsonl(tmp_path_factory.mktemp("chats") / "chats.jsonl", chat_rows())


def sft_config(base: Path, data: Path, out: Path, **kw: Any) -> SFTConfig:
    values = dict(checkpoint=str(base), data=str(data), out=str(out), batch_size=4,
                  max_steps=12, lr=3e-3, warmup_steps=2, eval_every=6, save_every=4,
                  keep_last=10, val_fraction=0.2, sample_prompt="add 1 and 2", sample_tokens=3,
                  **COMMON)
    return SFTConfig(**{**values, **kw})


def step_records(run: Path) -> dict[int, dict[str, Any]]:
    """The per-step records of a run, without the wall-clock figures."""
    return {r["step"]: {k: v for k, v in r.items() if k != "tokens_per_s"}
            for r in read_metrics(run / "metrics.jsonl") if "event" not in r}


def events(run: Path, name: str) -> list[dict[str, Any]]:
    return [r for r in read_metrics(run / "metrics.jsonl") if r.get("event") == name]


@pytest.fixture(scope="module")
def sft_run(trained_run: Path, chats: Path, tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    """A full SFT run of the tiny pretrained model, uninterrupted, and its summary."""
    out = tmp_path_factory.mktemp("sft") / "run"
    return out, finetune_sft(sft_config(trained_run, chats, out))


def _state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------- SFT


def test_sft_learns_the_replies_and_its_run_opens_like_any_other(
        sft_run, trained_run: Path, chats: Path, capsys) -> None:
    run, summary = sft_run
    config = sft_config(trained_run, chats, run)
    assert summary["step"] == 12 and summary["train_items"] == 32
    assert summary["val_items"] == 8 and summary["skipped_rows"] == 0

    # the held-out loss of the base, computed apart, is the run's step-0 evaluation
    base = lmforge.load(str(trained_run))
    _, val_rows, _ = read_split(config, conversation_rows)
    val_examples, _ = render_examples(base.tokenizer, val_rows, base.model.config.context)
    before = held_out_loss(base.model, val_examples, 4, pad_id_of(base.tokenizer),
                           torch.device("cpu"), torch.autocast("cpu", enabled=False))
    evals = events(run, "eval")
    assert [e["step"] for e in evals] == [0, 6, 12]
    assert evals[0]["val_loss"] == pytest.approx(before, rel=1e-5)
    assert evals[-1]["val_loss"] < 0.7 * before  # the one-digit replies are learned
    assert summary["val_loss"] == evals[-1]["val_loss"]
    losses = step_records(run)
    assert sorted(losses) == list(range(12)) and losses[11]["loss"] < losses[0]["loss"]
    assert len(events(run, "sample")) == 3 and (run / "samples.txt").is_file()

    recorded = json.loads((run / "config.json").read_text())["train"]
    assert recorded["method"] == "sft" and recorded["lora"] is None
    assert recorded["base"]["source"] == str(base.source.resolve())
    assert recorded["base"]["kind"] == "run" and recorded["base"]["quantization"] is None
    assert recorded["data"] == str(chats.resolve())

    tuned = lmforge.load(str(run))
    assert tuned.kind == "run" and tuned.run.path == run and tuned.quantization is None
    assert tuned.source.parent == run / "checkpoints"
    assert not lora_modules(tuned.model)
    assert not torch.equal(tuned.model.embed_tokens.weight, base.model.embed_tokens.weight)
    reply = chat_reply(tuned.model, tuned.tokenizer, "add 1 and 2", SamplingParams.greedy(4))
    assert reply.strip().isdigit(), reply  # a one-digit answer, then <|end|>

    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(run), "--prompt", "add", "--max-new-tokens",
                 "3"]) == 0
    assert capsys.readouterr().out.startswith("add")


def test_eval_bpb_runs_on_a_fine_tuned_run(sft_run, tmp_path: Path, capsys) -> None:
    run, _ = sft_run
    text = tmp_path / "text.txt"
    text.write_text("add 1 and 2\nadd 3 and 4\n", encoding="utf-8")
    assert main(["eval", "--checkpoint", str(run), "--tasks", "bpb", "--data", str(text),
                 "--out", str(tmp_path / "eval"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["model"]["kind"] == "run" and report["tasks"]["bpb"]["metrics"]["bpb"] > 0


def test_eval_defaults_on_a_fine_tuned_run_do_not_read_its_conversations(
        sft_run, trained_run: Path) -> None:
    # a fine-tuning run trained on conversations: its default data is its base's prepared data
    run, _ = sft_run
    assert RunDir(run).data_dir() == RunDir(trained_run).data_dir()


def test_sft_with_lora_trains_only_the_adapters(trained_run: Path, chats: Path,
                                                tmp_path: Path) -> None:
    run = tmp_path / "lora"
    # one checkpoint, the last: the run directory opens at the weights the adapter file holds
    summary = finetune_sft(sft_config(trained_run, chats, run, lora_rank=4, lr=1e-2,
                                      save_every=12, sample_tokens=0))
    base = lmforge.load(str(trained_run))
    base_state = base.model.state_dict()

    saved = load_checkpoint(Checkpoints(RunDir(run)).latest())["model"]
    lora_keys = [k for k in saved if ".lora_" in k]
    assert lora_keys and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in lora_keys)
    for key, value in saved.items():
        if ".lora_" not in key:  # every base weight, adapted projection or not, is untouched
            assert torch.equal(value, base_state[key.replace(".base_layer", "")]), key
    assert any(saved[k].abs().sum() > 0 for k in lora_keys if ".lora_B." in k)  # B left zero

    adapter = run / ADAPTER_FILE
    assert summary["adapter"] == str(adapter) and adapter.is_file()
    adapter_params = sum(saved[k].numel() for k in lora_keys)
    base_params = sum(v.numel() for v in base_state.values())
    assert adapter_params < 0.2 * base_params
    assert adapter.stat().st_size < 4 * adapter_params + 4096  # A and B in fp32, and a header

    ids = torch.tensor([render_chat(base.tokenizer, [Message("user", "add 1 and 2")])])
    fresh = lmforge.load(str(trained_run)).model
    load_adapter(fresh, adapter)
    expected = fresh(ids)

    merged = lmforge.load(str(run))
    assert merged.kind == "run" and not lora_modules(merged.model)
    assert not any(isinstance(m, LoraLinear) for m in merged.model.modules())
    assert set(merged.model.state_dict()) == set(base_state)  # the base's names
    torch.testing.assert_close(merged.model(ids), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(merged.model(ids), base.model(ids), atol=1e-4)

    unmerged = open_model(str(run), merge_adapters=False)
    assert len(lora_modules(unmerged.model)) == len(lora_modules(fresh))
    torch.testing.assert_close(unmerged.model(ids), expected, rtol=1e-6, atol=1e-6)


def test_the_public_load_can_keep_adapters_unmerged(trained_run: Path, chats: Path,
                                                    tmp_path: Path) -> None:
    run = tmp_path / "lora"
    finetune_sft(sft_config(trained_run, chats, run, lora_rank=2, max_steps=2, save_every=2,
                            sample_tokens=0))
    assert lora_modules(lmforge.load(str(run), merge_adapters=False).model)
    assert not lora_modules(lmforge.load(str(run)).model)


def test_an_interrupted_sft_run_resumes_bit_for_bit(sft_run, trained_run: Path, chats: Path,
                                                    tmp_path: Path, monkeypatch) -> None:
    straight, _ = sft_run
    resumed = tmp_path / "resumed"
    calls = {"n": 0}
    next_batch = SFTBatches.next_batch

    def preempted_at_the_seventh_batch(self):
        calls["n"] += 1
        if calls["n"] == 7:  # mid-run, between checkpoints (every 4 steps) and evaluations
            os.kill(os.getpid(), signal.SIGTERM)
        return next_batch(self)

    monkeypatch.setattr(SFTBatches, "next_batch", preempted_at_the_seventh_batch)
    with pytest.raises(TrainingInterrupted, match="SIGTERM: saved a checkpoint at step 7"):
        finetune_sft(sft_config(trained_run, chats, resumed))
    monkeypatch.setattr(SFTBatches, "next_batch", next_batch)
    assert (resumed / "checkpoints" / "step_0000007.pt").is_file()
    assert not (resumed / ADAPTER_FILE).exists()

    summary = finetune_sft(sft_config(trained_run, chats, resumed, resume=True))
    assert summary["step"] == 12
    assert step_records(resumed) == step_records(straight)  # losses, lr, grad norms: bit for bit
    assert [e["val_loss"] for e in events(resumed, "eval")] == \
        [e["val_loss"] for e in events(straight, "eval")]
    last = "checkpoints/step_0000012.pt"
    assert _state_equal(load_checkpoint(resumed / last)["model"],
                        load_checkpoint(straight / last)["model"])


# ------------------------------------------------------------------------------------- DPO


def dpo_config(base: Path, data: Path, out: Path, **kw: Any) -> DPOConfig:
    values = dict(checkpoint=str(base), data=str(data), out=str(out), batch_size=4,
                  max_steps=4, lr=1e-2, warmup_steps=1, eval_every=2, save_every=4,
                  val_fraction=0.25, **COMMON)
    return DPOConfig(**{**values, **kw})


def test_dpo_with_lora_uses_the_base_with_adapters_off_not_a_copy(
        trained_run: Path, tmp_path: Path, monkeypatch) -> None:
    pairs = _write_jsonl(tmp_path / "pairs.jsonl", preference_rows())

    def no_copies(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("DPO with LoRA deep-copied the model for its reference")

    monkeypatch.setattr(finetune_run, "copy", SimpleNamespace(deepcopy=no_copies))
    run = tmp_path / "dpo"
    summary = finetune_dpo(dpo_config(trained_run, pairs, run, lora_rank=4))
    assert summary["step"] == 4 and (run / ADAPTER_FILE).is_file()
    assert json.loads((run / "config.json").read_text())["train"]["method"] == "dpo"

    steps = step_records(run)
    assert sorted(steps) == [0, 1, 2, 3]
    for record in steps.values():
        assert {"reward_margin", "pref_accuracy", "reward_chosen", "reward_rejected"} <= set(record)
        assert 0 <= record["pref_accuracy"] <= 1
    # step 0 is taken before any update: the policy is its reference, every reward 0
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert steps[0]["reward_margin"] == 0 and steps[0]["pref_accuracy"] == 0
    evals = events(run, "eval")
    assert [e["step"] for e in evals] == [0, 2, 4]
    assert all("val_pref_accuracy" in e and "val_reward_margin" in e for e in evals)
    assert evals[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert evals[-1]["val_loss"] < math.log(2) and evals[-1]["val_reward_margin"] > 0


def test_full_dpo_takes_a_frozen_copy_for_its_reference(trained_run: Path, tmp_path: Path,
                                                        monkeypatch) -> None:
    import copy

    pairs = _write_jsonl(tmp_path / "pairs.jsonl", preference_rows())
    copied: list[type] = []

    def counting(obj: Any, *args: Any) -> Any:
        copied.append(type(obj))
        return copy.deepcopy(obj, *args)

    monkeypatch.setattr(finetune_run, "copy", SimpleNamespace(deepcopy=counting))
    run = tmp_path / "dpo"
    finetune_dpo(dpo_config(trained_run, pairs, run, max_steps=2, lr=1e-4, save_every=2))
    assert len(copied) == 1 and issubclass(copied[0], torch.nn.Module)
    assert events(run, "eval")[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert not (run / ADAPTER_FILE).exists()


# ------------------------------------------------------------------------------------ GRPO


def test_one_grpo_step_samples_rewards_and_saves(trained_run: Path, tmp_path: Path) -> None:
    data = _write_jsonl(tmp_path / "gsm8k.jsonl", gsm8k_rows())
    run = tmp_path / "grpo"
    summary = finetune_grpo(GRPOConfig(
        checkpoint=str(trained_run), data=str(data), out=str(run), batch_size=2, group_size=2,
        max_new_tokens=8, max_steps=1, warmup_steps=0, eval_every=1, save_every=1,
        val_fraction=0.25, val_max=2, **COMMON))
    assert summary["step"] == 1 and summary["train_questions"] == 6
    assert summary["val_questions"] == 2
    (record,) = step_records(run).values()
    assert {"reward", "pass_rate", "reply_tokens", "policy_loss"} <= set(record)
    assert 0 <= record["reward"] <= record["pass_rate"] <= 1
    assert 0 < record["reply_tokens"] <= 8
    assert all(0 <= e["val_pass_rate"] <= 1 for e in events(run, "eval"))
    assert [c["step"] for c in Checkpoints(RunDir(run)).entries()] == [1]
    recorded = json.loads((run / "config.json").read_text())["train"]
    assert recorded["method"] == "grpo" and recorded["group_size"] == 2
    assert lmforge.load(str(run)).kind == "run"


def test_grpo_scores_the_stop_token_the_policy_sampled(trained_run: Path, tmp_path: Path,
                                                       monkeypatch) -> None:
    import lmforge.finetune.grpo as grpo

    tok = lmforge.load(str(trained_run)).tokenizer
    # what the policy "samples" after every prompt: an answer, <|endoftext|>, then <|end|>
    stream = [*tok.encode("4"), tok.token_id(ENDOFTEXT), tok.token_id(END)]
    sampled: list[list[int]] = []  # each reply with the stop id that ended it

    def policy(model, prompts, params, *, stop_ids=(), include_stop=False, **kwargs):
        cut = next(i for i, t in enumerate(stream) if t in stop_ids)
        sampled.extend([stream[:cut + 1]] * len(prompts))
        # as generate_batch: the stop id left out unless asked for
        return [stream[:cut + include_stop] for _ in prompts]

    scored: list[list[int]] = []
    token_logprobs = grpo.token_logprobs

    def spy(model, ids, targets):
        scored.extend(row[row != -100].tolist() for row in targets)
        return token_logprobs(model, ids, targets)

    monkeypatch.setattr(grpo, "generate_batch", policy)
    monkeypatch.setattr(grpo, "token_logprobs", spy)
    data = _write_jsonl(tmp_path / "gsm8k.jsonl", gsm8k_rows())
    finetune_grpo(GRPOConfig(
        checkpoint=str(trained_run), data=str(data), out=str(tmp_path / "grpo"), batch_size=2,
        group_size=2, max_new_tokens=8, max_steps=1, warmup_steps=0, val_fraction=0.25,
        val_max=2, **COMMON))
    assert len(scored) == 4
    assert scored == sampled[-4:]


def test_question_batches_are_a_function_of_the_step() -> None:
    questions = [([i, i + 1], str(i)) for i in range(10)]
    a = QuestionBatches(questions, batch_size=3, seed=5)
    seen = [a.next_batch() for _ in range(7)]  # past the end of the first epoch (3 batches)
    assert len({s for _, s in seen}) == 7  # each step its own sampling seed
    assert all(len(qs) == 3 for qs, _ in seen)
    assert len({q[1] for qs, _ in seen[:3] for q in qs}) == 9  # an epoch: no question twice

    b = QuestionBatches(questions, batch_size=3, seed=5)
    b.step = 4
    assert b.next_batch() == seen[4]
    c = QuestionBatches(questions, batch_size=3, seed=5)
    c.load_state_dict(a.state_dict())
    assert c.step == 7 and c.next_batch() == a.next_batch()
    other = QuestionBatches(questions, batch_size=3, seed=6)
    assert other.next_batch() != seen[0]
    with pytest.raises(InputError, match="questions or the seed differ"):
        other.load_state_dict(a.state_dict())


def test_rollout_targets_are_the_sampled_reply(tokenizer) -> None:
    end = tokenizer.token_id(END)
    prompts = [render_chat(tokenizer, [Message("user", "2+2?")]),
               render_chat(tokenizer, [Message("user", "what is 10 plus 7?")])]
    # one reply ended by the stop token it sampled, one cut by the length cap
    replies = [[*tokenizer.encode("4"), end], tokenizer.encode(" 1 7 . ")[:4]]
    ids, targets = rollout_batch(prompts, replies, pad_id_of(tokenizer))
    assert ids.shape == targets.shape == (2, max(len(p) + len(r) for p, r in
                                                 zip(prompts, replies, strict=True)) - 1)
    for row, (prompt, reply) in enumerate(zip(prompts, replies, strict=True)):
        scored = targets[row][targets[row] != -100].tolist()
        assert scored == reply  # every sampled token, the stop token included, and no other
        first = int((targets[row] != -100).nonzero()[0])
        assert first == len(prompt) - 1  # the first reply token is predicted from the prompt
        assert ids[row, :len(prompt)].tolist() == prompt


def test_questions_leave_room_for_the_reply(tokenizer) -> None:
    rows = [[Message("user", "2+2?"), Message("assistant", "#### 4")],
            [Message("user", "x" * 200), Message("assistant", "#### 1")]]
    questions = questions_of(tokenizer, rows, context=32, room=8)
    assert questions == [(render_chat(tokenizer, rows[0][:1]), "#### 4")]


# ------------------------------------------------------------------------------------- CLI


def _sft_argv(base: Path, *rest: str) -> list[str]:
    return ["finetune", "sft", "--checkpoint", str(base), "--device", "cpu", "--dtype", "fp32",
            "--no-progress", "--max-steps", "1", "--batch-size", "2", "--sample-tokens", "0",
            *rest]


def test_cli_refusals_are_one_line(trained_run: Path, chats: Path, tmp_path: Path,
                                   capsys) -> None:
    out = tmp_path / "out"
    one_line_error(capsys, main(_sft_argv(trained_run, "--out", str(out))), "--data", "required")

    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"nothing": 1}, [1, 2], "text"])
    one_line_error(capsys, main(_sft_argv(trained_run, "--data", str(bad), "--out", str(out))),
                   str(bad), "no usable row", "3 bad rows")

    rows = chat_rows(6)
    rows.insert(3, {"messages": [{"role": "robot", "content": "hi"}]})
    one_bad = _write_jsonl(tmp_path / "one_bad.jsonl", rows)
    one_line_error(capsys, main(_sft_argv(trained_run, "--data", str(one_bad), "--out", str(out),
                                          "--strict")), f"{one_bad}:4")

    pairs = _write_jsonl(tmp_path / "pairs.jsonl", preference_rows(6))
    one_line_error(capsys, main(["finetune", "dpo", "--checkpoint", str(trained_run), "--data",
                                 str(pairs), "--out", str(out), "--reference", "adapters"]),
                   "--reference", "--lora-rank")
    assert not out.exists()  # nothing was written by a refused run


def test_a_file_of_only_bad_rows_is_named(trained_run: Path, tmp_path: Path, capsys) -> None:
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"nothing": 1}, [1, 2], "text"])
    one_line_error(capsys, main(_sft_argv(trained_run, "--data", str(bad), "--out",
                                          str(tmp_path / "out"))), str(bad))


def test_an_existing_run_needs_resume(sft_run, trained_run: Path, chats: Path,
                                      capsys) -> None:
    run, _ = sft_run
    before = (run / "metrics.jsonl").read_text()
    one_line_error(capsys, main(_sft_argv(trained_run, "--data", str(chats), "--out", str(run))),
                   "already holds a run", "--resume")
    assert (run / "metrics.jsonl").read_text() == before


def test_a_quantized_base_needs_lora(trained_run: Path, chats: Path, tmp_path: Path,
                                     capsys) -> None:
    from lmforge.quantize.stage import QuantizeConfig, quantize

    quantized = tmp_path / "m.int8.safetensors"
    quantize(QuantizeConfig(checkpoint=str(trained_run), out=str(quantized), mode="int8",
                            batch_size=4, eval_batches=1, dtype="fp32", progress=False))
    one_line_error(capsys, main(_sft_argv(quantized, "--data", str(chats), "--out",
                                          str(tmp_path / "out"))), "int8", "--lora-rank")
    assert not (tmp_path / "out").exists()

    # with LoRA it trains (QLoRA) and opens again on its quantized base, adapters unmerged
    run = tmp_path / "qlora"
    assert main(_sft_argv(quantized, "--data", str(chats), "--out", str(run), "--lora-rank",
                          "4", "--max-steps", "2", "--eval-every", "2")) == 0
    recorded = json.loads((run / "config.json").read_text())["train"]
    assert recorded["base"]["quantization"] == "int8"
    assert recorded["base"]["source"] == str(quantized.resolve())
    tuned = lmforge.load(str(run))
    assert tuned.quantization == "int8" and lora_modules(tuned.model)
    ids = torch.tensor([render_chat(tuned.tokenizer, [Message("user", "add 1 and 2")])])
    assert torch.isfinite(tuned.model(ids)).all()


def test_sft_help_lists_the_lora_flags(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["finetune", "sft", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--lora-rank", "--lora-alpha", "--lora-targets", "--data", "--resume"):
        assert flag in out, flag


def test_export_peft_of_a_lora_run_loads_in_peft(trained_run: Path, chats: Path,
                                                 tmp_path: Path, capsys) -> None:
    peft = pytest.importorskip("peft", reason="peft is not installed: pip install "
                                              "'lmforge[finetune]'")
    run = tmp_path / "lora"
    finetune_sft(sft_config(trained_run, chats, run, lora_rank=2, lr=1e-2, max_steps=3,
                            save_every=3, sample_tokens=0))
    out = tmp_path / "peft"
    assert main(["export", "peft", "--checkpoint", str(run), "--out", str(out)]) == 0
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in
                                                                    out.iterdir()}
    ours = lmforge.load(str(run))
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.tensor([render_chat(ours.tokenizer, [Message("user", "add 1 and 2")])])
    with torch.no_grad():
        expected = ours.model(ids)
        torch.testing.assert_close(theirs(ids).logits, expected, rtol=1e-5, atol=1e-5)
    # a run without adapters is refused in one line, and an existing output without --force
    capsys.readouterr()
    one_line_error(capsys, main(["export", "peft", "--checkpoint", str(trained_run), "--out",
                                 str(tmp_path / "none")]), "not a LoRA fine-tuning run")
    one_line_error(capsys, main(["export", "peft", "--checkpoint", str(run), "--out",
                                 str(out)]), "--force")
