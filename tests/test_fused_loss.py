"""The chunked linear + cross-entropy equals the plain computation, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.fused_loss import linear_cross_entropy
from lmforge.model import ModelConfig, Transformer, lm_loss


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_matches_cross_entropy_with_ignored_rows(chunk):
    torch.manual_seed(0)
    h = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(30, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 30, (50,))
    t[::7] = -100
    loss = linear_cross_entropy(h, w, t, chunk=chunk)
    (gh, gw) = torch.autograd.grad(loss * 3.0, (h, w))
    ref = F.cross_entropy(h @ w.T, t, ignore_index=-100)
    (rh, rw) = torch.autograd.grad(ref * 3.0, (h, w))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    assert torch.allclose(gh, rh, atol=1e-12) and torch.allclose(gw, rw, atol=1e-12)


def test_model_loss_path_equals_logits_path():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4,
                                    n_kv_heads=2, context=16, tie_embeddings=True))
    ids = torch.randint(0, 97, (3, 16))
    targets = torch.randint(0, 97, (3, 16))
    fused = model(ids, targets)
    fused.backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    plain = lm_loss(model(ids), targets)
    plain.backward()
    assert fused.item() == pytest.approx(plain.item(), rel=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(fused_grads[n], p.grad, atol=1e-6), n
