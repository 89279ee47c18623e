"""The fine-tuning objectives: log-probs against a naive loop and the model's own loss, DPO and
GRPO on hand-worked numbers, and parity with TRL's DPOTrainer and GRPO reward scaling."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from lmforge.errors import InputError
from lmforge.finetune import objectives
from lmforge.finetune.objectives import (
    dpo_loss,
    group_advantages,
    policy_gradient_loss,
    sequence_logprobs,
    token_logprobs,
)

from .conftest import tiny_model

# ---------------------------------------------------------------------------------- log-probs


def _sft_batch(vocab: int = 97) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows of 12 ids; targets = next id on a row-specific response span, −100 elsewhere
    (the last row scores nothing, as a fully masked row can)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (3, 12), generator=g)
    targets = torch.full_like(ids, -100)
    for row, (start, end) in enumerate([(3, 11), (0, 5), (6, 6)]):
        targets[row, start:end] = ids[row, start + 1 : end + 1]
    return ids, targets


@torch.no_grad()
def test_sequence_logprobs_equal_a_naive_loop_over_prefixes():
    model = tiny_model()
    ids, targets = _sft_batch()
    expected = []
    for b in range(ids.shape[0]):
        total = 0.0
        for t in range(ids.shape[1]):
            if targets[b, t] != -100:  # one forward per prefix: also checks causality
                logits = model(ids[b : b + 1, : t + 1])[0, -1].double()
                total += torch.log_softmax(logits, dim=-1)[targets[b, t]].item()
        expected.append(total)
    got = sequence_logprobs(model, ids, targets)
    assert got.dtype == torch.float32 and got.shape == (3,)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32), atol=1e-4,
                               rtol=1e-5)
    assert got[2] == 0  # a row with nothing to score
    per_token = token_logprobs(model, ids, targets)
    assert per_token.shape == ids.shape
    assert (per_token[targets == -100] == 0).all() and (per_token[targets != -100] < 0).all()


@torch.no_grad()
def test_sequence_logprobs_equal_the_models_mean_loss_times_count():
    model = tiny_model()
    ids, targets = _sft_batch()
    for row in range(2):
        n = (targets[row] != -100).sum()
        mean_loss = model(ids[row : row + 1], targets[row : row + 1])
        torch.testing.assert_close(sequence_logprobs(model, ids[row : row + 1],
                                                     targets[row : row + 1]),
                                   -(mean_loss * n).reshape(1), atol=1e-4, rtol=1e-5)


@torch.no_grad()
def test_token_logprobs_chunked_and_upcast(monkeypatch):
    model = tiny_model()
    ids, targets = _sft_batch()
    whole = token_logprobs(model, ids, targets)
    monkeypatch.setattr(objectives, "_CHUNK_ELEMENTS", 1)  # one row per chunk
    torch.testing.assert_close(token_logprobs(model, ids, targets), whole)
    half = token_logprobs(lambda x: model(x).bfloat16(), ids, targets)
    assert half.dtype == torch.float32  # bf16 logits, fp32 log-softmax
    torch.testing.assert_close(half, whole, atol=0.1, rtol=0.05)


def test_token_logprobs_rejects_mismatched_shapes():
    with pytest.raises(InputError, match="ids and targets"):
        token_logprobs(tiny_model(), torch.zeros(2, 5, dtype=torch.long),
                       torch.zeros(2, 4, dtype=torch.long))


# ---------------------------------------------------------------------------------------- DPO


def test_dpo_hand_worked():
    pc = torch.tensor([-1.0, -2.0], requires_grad=True)
    pr, rc, rr = torch.tensor([-3.0, -1.5]), torch.tensor([-1.5, -1.8]), torch.tensor([-2.0, -2.5])
    out = dpo_loss(pc, pr, rc, rr, beta=0.1)
    # pair 0: ρc = 0.5, ρr = −1.0, z = 0.1·1.5 = 0.15;  pair 1: ρc = −0.2, ρr = 1.0, z = −0.12
    z = [0.15, -0.12]
    expected = sum(math.log1p(math.exp(-zi)) for zi in z) / 2  # −log σ(z) = log(1 + e^−z)
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.05, -0.02]))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-0.1, 0.1]))
    assert out.margin.item() == pytest.approx((0.15 - 0.12) / 2, abs=1e-6)
    assert out.accuracy.item() == 0.5
    out.loss.backward()
    # ∂L/∂πc = −β·σ(−z)/B: pushing the chosen log-prob up always lowers the loss
    sig = [1 / (1 + math.exp(zi)) for zi in z]
    torch.testing.assert_close(pc.grad, torch.tensor([-0.1 * s / 2 for s in sig]))
    assert not out.chosen_rewards.requires_grad and not out.margin.requires_grad


def test_dpo_is_stable_for_huge_margins():
    zero = torch.zeros(2)
    out = dpo_loss(torch.tensor([1e4, -1e4]), zero, zero, zero, beta=0.5)
    # pair 0: −log σ(5000) ≈ 0; pair 1: −log σ(−5000) ≈ 5000
    assert math.isfinite(out.loss.item())
    assert out.loss.item() == pytest.approx(5000 / 2, rel=1e-6)


def test_dpo_rejects_bad_inputs():
    with pytest.raises(InputError, match="shape"):
        dpo_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2))
    with pytest.raises(InputError, match="beta"):
        dpo_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2), beta=0.0)


def _tiny_hf_tokenizer(words: list[str]):
    """A word-level fast tokenizer built in memory (no download): one id per word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def test_dpo_matches_trl_dpo_trainer(tmp_path):
    """A real TRL DPOTrainer (tiny Llama policy and a differently seeded reference) computes its
    sigmoid loss on a collated batch of two pairs; we recompute the same batch with our
    ``sequence_logprobs`` (from the same HF models' logits) and ``dpo_loss``, and compare the loss,
    the gradient it gives every policy weight, and TRL's logged log-probs and rewards."""
    pytest.importorskip("trl", reason="TRL parity needs `pip install -e .[finetune]`")
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    assert DPOConfig.__dataclass_fields__["beta"].default == 0.1
    assert inspect.signature(dpo_loss).parameters["beta"].default == 0.1

    words = ["<pad>", "<eos>", "<unk>", "the", "cat", "dog", "sat", "on", "a", "mat", "ran", "far",
             "away", "big", "small", "red", "blue", "is", "was", "and"]
    tokenizer = _tiny_hf_tokenizer(words)

    def llama(seed: int) -> LlamaForCausalLM:
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            pad_token_id=0, eos_token_id=1, bos_token_id=None))

    pairs = Dataset.from_list([
        {"prompt": "the cat", "chosen": " sat on a mat", "rejected": " ran"},
        {"prompt": "a big red dog", "chosen": " was small", "rejected": " is blue and far away"},
    ])
    beta = 2.0  # large, so that a slip in the log-ratios moves the loss far from log 2
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, beta=beta,
                     per_device_train_batch_size=2, max_length=None)
    policy, reference = llama(0), llama(1)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=pairs,
                         processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    assert (batch["completion_mask"].sum(1) > 1).all() and (batch["input_ids"] != 2).all()
    policy.train()
    trl_loss = trainer.compute_loss(policy, batch)
    trl_loss.backward()
    trl_grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    # Our convention: targets[t] = ids[t+1] where ids[t+1] is a completion token, else −100.
    ids = batch["input_ids"]
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:].masked_fill(batch["completion_mask"][:, 1:] == 0, -100)
    policy_logps = sequence_logprobs(lambda x: policy(x).logits, ids, targets)
    with torch.no_grad():
        ref_logps = sequence_logprobs(lambda x: reference(x).logits, ids, targets)
    out = dpo_loss(*policy_logps.chunk(2), *ref_logps.chunk(2), beta=beta)
    out.loss.backward()

    assert abs(out.loss.item() - math.log(2)) > 0.05  # the comparison is not of two log 2s
    torch.testing.assert_close(out.loss, trl_loss.detach(), atol=1e-5, rtol=1e-5)
    for name, p in policy.named_parameters():
        torch.testing.assert_close(p.grad, trl_grads[name], atol=1e-6, rtol=1e-4, msg=name)
    chosen, rejected = policy_logps.detach().chunk(2)
    assert chosen.mean().item() == pytest.approx(logged["logps/chosen"], abs=1e-4)
    assert rejected.mean().item() == pytest.approx(logged["logps/rejected"], abs=1e-4)
    assert out.chosen_rewards.mean().item() == pytest.approx(logged["rewards/chosen"], abs=1e-5)
    assert out.rejected_rewards.mean().item() == pytest.approx(logged["rewards/rejected"],
                                                               abs=1e-5)
    assert out.margin.item() == pytest.approx(logged["rewards/margins"], abs=1e-5)
    assert out.accuracy.item() == pytest.approx(logged["rewards/accuracies"])


# --------------------------------------------------------------------------------------- GRPO


def test_group_advantages_hand_worked():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    torch.testing.assert_close(group_advantages(rewards, 4),
                               torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    # unbiased std of [1, 0, 0, 1]: sqrt(4 · 0.25 / 3); a group of equal rewards stays at 0
    s = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, 4, scale_by_std=True),
                               torch.tensor([s, -s, -s, s, 0, 0, 0, 0]))
    torch.testing.assert_close(group_advantages(rewards, 1, scale_by_std=True),
                               torch.zeros(8))
    with pytest.raises(InputError, match="group_size"):
        group_advantages(rewards, 3)


def test_group_advantages_match_trl_reward_scaling():
    """TRL's GRPOTrainer (scale_rewards="group"): (r − group mean) / (nanstd(group) + 1e-4)."""
    pytest.importorskip("trl", reason="TRL parity needs `pip install -e .[finetune]`")
    from trl.trainer.utils import nanstd

    rewards = torch.rand(6 * 5, generator=torch.Generator().manual_seed(0))
    grouped = rewards.view(-1, 5)
    expected = (grouped - grouped.mean(1, keepdim=True)) / (nanstd(grouped, dim=1)[:, None] + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, 5, scale_by_std=True),
                               expected.view(-1))


def test_policy_gradient_loss_hand_worked_on_policy():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -4.0, -9.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    advantages = torch.tensor([1.0, -0.5])
    loss, metrics = policy_gradient_loss(logp, advantages, mask)
    # ratio ≡ 1: per-token −A over the 3 unmasked tokens: (−1 − 1 + 0.5) / 3
    assert loss.item() == pytest.approx(-0.5)
    assert metrics["policy_loss"].item() == pytest.approx(-0.5)
    assert "clip_fraction" not in metrics and "kl" not in metrics
    loss.backward()
    # REINFORCE: ∂L/∂logp_t = −A / n_tokens; a positive-advantage token's logp up → loss down
    torch.testing.assert_close(logp.grad, torch.tensor([[-1 / 3, -1 / 3, 0], [0.5 / 3, 0, 0]]))
    assert logp.grad[0, 0] < 0


def test_policy_gradient_loss_kl_term():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    mask, advantages = torch.ones(1, 2), torch.tensor([0.0])
    loss, metrics = policy_gradient_loss(logp, advantages, mask, ref_logprobs=logp.detach(),
                                         kl_coef=0.5)
    assert loss.item() == 0 and metrics["kl"].item() == 0  # ref == policy: no penalty
    ref = torch.tensor([[-1.5, -1.0]])  # ref − logp = −0.5, +1.0
    loss, metrics = policy_gradient_loss(logp, advantages, mask, ref_logprobs=ref, kl_coef=0.5)
    k3 = [math.exp(d) - d - 1 for d in (-0.5, 1.0)]
    assert metrics["kl"].item() == pytest.approx(sum(k3) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.5 * sum(k3) / 2, abs=1e-6)
    _, metrics = policy_gradient_loss(logp, advantages, mask, ref_logprobs=ref)
    assert metrics["kl"].item() > 0  # logged even when not in the loss
    with pytest.raises(InputError, match="ref_logprobs"):
        policy_gradient_loss(logp, advantages, mask, kl_coef=0.1)


def test_policy_gradient_loss_clipping():
    """ratio 1.5 or 0.5 with ε = 0.2 against A = ±1: PPO's pessimistic min clips exactly the
    cases where the ratio has already moved in the advantage's direction past 1 ± ε."""
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]])).requires_grad_()
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, metrics = policy_gradient_loss(logp, advantages, torch.ones(1, 4), old_logprobs=old,
                                         clip_eps=0.2)
    # per token: −1.2 (clipped), +1.5, −0.5, +0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 + 1.5 - 0.5 + 0.8) / 4, abs=1e-6)
    assert metrics["clip_fraction"].item() == 0.5
    loss.backward()
    # clipped tokens get no gradient; the others −A·ratio / n_tokens
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 1.5 / 4, -0.5 / 4, 0.0]]))
    inside, metrics = policy_gradient_loss(torch.zeros(1, 4), advantages, torch.ones(1, 4),
                                           old_logprobs=old)
    assert inside.item() == 0 and metrics["clip_fraction"].item() == 0  # ratio 1: no clipping
