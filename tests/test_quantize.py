"""Weight-only quantization: layer error bounds, int4 packing, whole-model drift, save/load, size,
GPTQ. Hermetic: tiny models built and briefly trained inside the tests."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.model import ModelConfig, Transformer, lm_loss
from lmforge.quantize import (
    Int4Linear,
    Int8Linear,
    gptq_quantize_model,
    gptq_quantize_weight,
    load_quantized,
    pack_int4,
    quantize_int4,
    quantize_model,
    save_quantized,
    size_report,
    unpack_int4,
)

CONFIG = dict(vocab_size=64, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, context=32)


def _batch(seed: int, batch: int = 8) -> torch.Tensor:
    """Token ids (batch, context+1) following a learnable rule: next = (3·prev + 1) mod vocab."""
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, CONFIG["vocab_size"], (batch,), generator=g)]
    for _ in range(CONFIG["context"]):
        ids.append((3 * ids[-1] + 1) % CONFIG["vocab_size"])
    return torch.stack(ids, dim=1)


@pytest.fixture(scope="module")
def trained() -> Transformer:
    """A tiny model trained for a few steps, so its weights and loss are not those of init."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**CONFIG))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(40):
        ids = _batch(step)
        loss = model(ids[:, :-1], ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _loss(model: nn.Module) -> float:
    ids = _batch(1000, batch=16)
    with torch.no_grad():
        return lm_loss(model(ids[:, :-1]), ids[:, 1:]).item()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ------------------------------------------------------------------------------------- layers


def test_int8_linear_within_scale_bound() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=True)
    q = Int8Linear.from_linear(linear)
    assert q.weight.dtype == torch.int8 and q.scales.shape == (40,)
    # Per-element weight error ≤ scale/2 (round to nearest) ⇒ |Δy| ≤ Σ|x|·scale/2 per output.
    err = (q.dequantize() - linear.weight).abs()
    assert (err <= q.scales[:, None] / 2 + 1e-7).all()
    x = torch.randn(5, 7, 96)
    with torch.no_grad():
        dy = (q(x) - linear(x)).abs()
    bound = x.abs().sum(-1, keepdim=True) * q.scales / 2
    assert (dy <= bound + 1e-5).all()
    assert _rel(q(x), linear(x).detach()) < 0.01


def test_int4_linear_within_scale_bound() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(128, 24, bias=False)
    q = Int4Linear.from_linear(linear, group_size=32)
    assert q.weight.dtype == torch.uint8 and q.weight.shape == (24, 64)
    assert q.scales.shape == (24, 4)
    step = q.scales.float().repeat_interleave(32, dim=1)  # (out, in): each weight's scale
    assert ((q.dequantize() - linear.weight).abs() <= step / 2 + 1e-7).all()
    x = torch.randn(10, 128)
    with torch.no_grad():
        dy = (q(x) - linear(x)).abs()
    bound = x.abs() @ (step / 2).T  # (10, out)
    assert (dy <= bound + 1e-5).all()
    assert _rel(q(x), linear(x).detach()) < 0.15


@pytest.mark.parametrize("cls", ["int8", "int4"])
def test_bf16_input_matches_fp32(cls: str) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 16, bias=True)
    q = Int8Linear.from_linear(linear) if cls == "int8" else Int4Linear.from_linear(linear, 32)
    x = torch.randn(4, 64)
    y32, y16 = q(x), q(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    assert _rel(y16.float(), y32) < 0.02


def test_int4_pack_unpack_exact_for_all_values() -> None:
    codes = torch.tensor([[a, b] for a in range(16) for b in range(16)], dtype=torch.uint8)
    codes = codes.flatten().view(4, 128)  # every ordered pair of nibbles appears
    packed = pack_int4(codes)
    assert packed.shape == (4, 64) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)
    assert torch.equal(pack_int4(unpack_int4(packed)), packed)
    assert sorted(packed.flatten().tolist()) == list(range(256))


def test_int4_uses_full_code_range() -> None:
    w = torch.linspace(-1, 1, 64).repeat(2, 1)
    packed, _ = quantize_int4(w, group_size=64)
    values = set(unpack_int4(packed).flatten().tolist())
    assert values >= set(range(1, 16))  # codes -7..7 (+8); -8 is reachable only by rounding


def test_bad_group_size_is_config_error(trained: Transformer) -> None:
    with pytest.raises(ConfigError, match="not divisible"):
        Int4Linear.from_linear(nn.Linear(96, 8), group_size=64)
    with pytest.raises(ConfigError, match="positive even"):
        quantize_int4(torch.randn(4, 64), group_size=0)
    model = copy.deepcopy(trained)
    with pytest.raises(ConfigError, match="group_size"):  # 384-wide down_proj: 384 % 256 ≠ 0
        quantize_model(model, "int4", group_size=256)
    assert not any(isinstance(m, Int4Linear) for m in model.modules())  # left untouched
    with pytest.raises(ConfigError, match="mode"):
        quantize_model(model, "int3")  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------- model


@pytest.mark.parametrize(("mode", "max_rel", "max_dloss"), [("int8", 0.01, 0.005),
                                                            ("int4", 0.08, 0.05)])
def test_quantized_model_stays_close(trained: Transformer, mode: str, max_rel: float,
                                     max_dloss: float) -> None:
    ids = _batch(2000)[:, :-1]
    with torch.no_grad():
        ref = trained(ids)
    model = quantize_model(copy.deepcopy(trained), mode, group_size=64)
    kinds = {name: type(m).__name__ for name, m in model.named_modules()}
    assert kinds["layers.0.self_attn.q_proj"] == ("Int8Linear" if mode == "int8" else "Int4Linear")
    assert kinds["layers.1.mlp.down_proj"] == kinds["layers.0.self_attn.q_proj"]
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.embed_tokens, nn.Embedding)
    assert model.lm_head.weight is model.embed_tokens.weight  # tie survives
    with torch.no_grad():
        out = model(ids)
    assert _rel(out, ref) < max_rel
    assert abs(_loss(model) - _loss(trained)) < max_dloss
    # The fused-loss training path (uses lm_head.weight directly) agrees with the logits path.
    targets = _batch(2000)[:, 1:]
    with torch.no_grad():
        assert torch.allclose(model(ids, targets), lm_loss(out, targets), atol=1e-4)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_save_load_round_trip(trained: Transformer, tmp_path, mode: str) -> None:
    model = quantize_model(copy.deepcopy(trained), mode, group_size=32)
    path = save_quantized(model, tmp_path / "q.pt")
    loaded = load_quantized(path)
    assert loaded.config == model.config
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    ids = _batch(3000)[:, :-1]
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temporary behind


def _fp32_bytes(model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


@pytest.mark.parametrize(("mode", "lo", "hi"), [("int8", 0.25, 0.26), ("int4", 0.125, 0.135)])
def test_size_on_disk(tmp_path, mode: str, lo: float, hi: float) -> None:
    # vocab 64 keeps the (unquantized) embedding small next to the quantized layers.
    model = Transformer(ModelConfig(**CONFIG))
    fp32_file = _fp32_bytes(model)
    quantize_model(model, mode, group_size=128)
    report = size_report(model)
    assert lo <= report.ratio <= hi
    file = save_quantized(model, tmp_path / "q.pt").stat().st_size
    # The file holds the reported tensors plus a little pickle/zip overhead.
    assert report.total_bytes <= file <= report.total_bytes * 1.05 + 64 * 1024
    # Quantized layers shrink by the ratio; the embedding and norms are unchanged.
    expected = report.other_bytes + report.quantized_fp32_bytes * report.ratio
    assert file / fp32_file == pytest.approx(expected / (report.other_bytes
                                                         + report.quantized_fp32_bytes), rel=0.1)


# --------------------------------------------------------------------------------------- GPTQ


def test_gptq_beats_round_to_nearest_on_correlated_inputs() -> None:
    torch.manual_seed(0)
    n_in, n_out = 128, 32
    # Strongly correlated, anisotropic inputs: where error compensation pays off.
    mix = torch.randn(n_in, n_in) * torch.logspace(0, -2, n_in)
    x = torch.randn(2048, n_in) @ mix.T
    weight = torch.randn(n_out, n_in) * 0.05
    H = 2 * x.double().T @ x.double() / x.shape[0]
    packed, scales = gptq_quantize_weight(weight, H, group_size=32)
    gptq = Int4Linear(n_in, n_out, 32)
    gptq.weight, gptq.scales = packed, scales
    rtn = Int4Linear(n_in, n_out, 32)
    rtn.weight, rtn.scales = quantize_int4(weight, 32)
    ref = x @ weight.T
    e_gptq, e_rtn = _rel(gptq(x), ref), _rel(rtn(x), ref)
    assert e_gptq < 0.7 * e_rtn, (e_gptq, e_rtn)


def test_gptq_model_close_and_not_worse_than_rtn(trained: Transformer, tmp_path) -> None:
    calibration = [_batch(4000 + i)[:, :-1] for i in range(4)]
    ids = _batch(5000)[:, :-1]
    with torch.no_grad():
        ref = trained(ids)
    gptq = gptq_quantize_model(copy.deepcopy(trained), calibration, group_size=64)
    rtn = quantize_model(copy.deepcopy(trained), "int4", group_size=64)
    assert sum(isinstance(m, Int4Linear) for m in gptq.modules()) == 14  # 7 per block
    with torch.no_grad():
        e_gptq, e_rtn = _rel(gptq(ids), ref), _rel(rtn(ids), ref)
    assert e_gptq < 0.08 and e_gptq < e_rtn, (e_gptq, e_rtn)
    assert abs(_loss(gptq) - _loss(trained)) < 0.05
    loaded = load_quantized(save_quantized(gptq, tmp_path / "gptq.pt"))
    with torch.no_grad():
        assert torch.equal(loaded(ids), gptq(ids))
