"""Weight-only quantization: layer error bounds, int4 packing, CPU kernels, whole-model drift,
files, size, GPTQ, AWQ and the ``lmforge quantize`` stage. Hermetic: tiny models and data built
(and briefly trained) inside the tests."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lmforge
from lmforge.cli import main
from lmforge.data.manifest import totals, write_manifest
from lmforge.data.shards import write_shard
from lmforge.errors import ConfigError, InputError
from lmforge.model import ModelConfig, Transformer, lm_loss
from lmforge.quantize import (
    Int4Linear,
    Int8Linear,
    QuantizeConfig,
    awq_scale_model,
    gptq_quantize_model,
    gptq_quantize_weight,
    load_quantized,
    open_quantized,
    pack_int4,
    quantize,
    quantize_int4,
    quantize_model,
    save_quantized,
    size_report,
    unpack_int4,
)
from lmforge.quantize.awq import fold_scale, scale_groups
from lmforge.quantize.calibration import calibration_batches
from lmforge.tokenizer import Tokenizer

from .conftest import TINY_MODEL, synthetic_documents

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


@pytest.mark.parametrize(("mode", "group_size"), [("int8", 0), ("int4", 32), ("int4", 64),
                                                ("int4", 128)])
def test_cpu_kernel_agrees_with_dequantize_path(mode: str, group_size: int) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(256, 48, bias=True)
    q = Int8Linear.from_linear(linear) if mode == "int8" else \
        Int4Linear.from_linear(linear, group_size)
    x = torch.randn(3, 5, 256).bfloat16()
    with torch.no_grad():
        fused = q(x)  # bf16 activations on CPU: the fused weight-only kernel
        reference = F.linear(x.float(), q.dequantize(), q.bias)
        assert torch.allclose(q(x.float()), reference, atol=1e-5)  # fp32: dequantize path
    assert fused.dtype == torch.bfloat16 and fused.shape == (3, 5, 48)
    assert _rel(fused.float(), reference) < 1e-2  # bf16 rounding of scales and outputs
    if mode == "int4":
        assert q._cpu_kernel_weights is not None  # the kernel's layout was built and kept


def test_int4_kernel_layout_rebuilt_when_codes_change() -> None:
    torch.manual_seed(0)
    a, b = (Int4Linear.from_linear(nn.Linear(128, 32), 64) for _ in range(2))
    x = torch.randn(4, 128).bfloat16()
    with torch.no_grad():
        before = a(x)
        a.load_state_dict(b.state_dict())
        assert a._cpu_kernel_weights is None
        assert torch.equal(a(x), b(x)) and not torch.equal(a(x), before)
        a.set_quantized(*quantize_int4(torch.randn(32, 128), 64))
        assert a._cpu_kernel_weights is None


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


# ---------------------------------------------------------------------------------------- AWQ


def _calibration() -> list[torch.Tensor]:
    return [_batch(4000 + i)[:, :-1] for i in range(4)]


def test_awq_folding_keeps_the_float_model(trained: Transformer) -> None:
    ids = _batch(6000)[:, :-1]
    with torch.no_grad():
        ref = trained(ids)
    model = copy.deepcopy(trained)  # arbitrary scales: W·diag(s)·(x/s) = W·x for any s > 0
    g = torch.Generator().manual_seed(0)
    for i, block in enumerate(model.layers):
        for group in scale_groups(block, f"layers.{i}"):  # o_proj's group spans 2 query heads
            fold_scale(group, torch.exp(torch.randn(group.prev.weight.shape[0], generator=g)))
    searched = copy.deepcopy(trained)
    alphas = awq_scale_model(searched, _calibration(), "int4", group_size=32)
    assert len(alphas) == 4 * len(trained.layers) and all(0 <= a < 1 for a in alphas.values())
    with torch.no_grad():
        for folded in (model, searched):
            assert torch.allclose(folded(ids), ref, atol=1e-5, rtol=1e-5)


def _plant_outliers(model: Transformer) -> Transformer:
    """The same function, but with a few channels of both norms' outputs 30× larger than the
    rest — the activation outliers of real LLMs that AWQ is for — and their weights 30×
    smaller."""
    s = torch.ones(model.config.d_model)
    s[:4] = 1 / 30
    for i, block in enumerate(model.layers):
        qkv, _, gate_up, _ = scale_groups(block, f"layers.{i}")
        fold_scale(qkv, s)
        fold_scale(gate_up, s)
    return model


@pytest.mark.parametrize("outliers", [False, True])
def test_awq_does_not_hurt_and_helps_with_outliers(trained: Transformer, outliers: bool) -> None:
    model = _plant_outliers(copy.deepcopy(trained)) if outliers else copy.deepcopy(trained)
    ids = _batch(5000)[:, :-1]
    with torch.no_grad():
        ref = model(ids)
    rtn = quantize_model(copy.deepcopy(model), "int4", group_size=32)
    awq = copy.deepcopy(model)
    awq_scale_model(awq, _calibration(), "int4", group_size=32)
    quantize_model(awq, "int4", group_size=32)
    with torch.no_grad():
        e_rtn, e_awq = _rel(rtn(ids), ref), _rel(awq(ids), ref)
    assert e_awq < (0.7 if outliers else 1.05) * e_rtn, (e_awq, e_rtn)


# -------------------------------------------------------------------------------------- files


def test_bad_quantized_files_are_one_line_input_errors(trained: Transformer, tmp_path) -> None:
    from safetensors.torch import save_file

    model = quantize_model(copy.deepcopy(trained), "int4", group_size=32)
    path = save_quantized(model, tmp_path / "q.safetensors")
    with pytest.raises(InputError, match="without a tokenizer"):
        lmforge.load(str(path))
    tok = Tokenizer.train(synthetic_documents(40), 300, workers=1, show_progress=False)
    with pytest.raises(InputError, match="tokenizer has 300 ids"):  # the model's vocab is 64
        lmforge.load(str(save_quantized(model, tmp_path / "q.safetensors", tok)))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-100])
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    for bad, message in [(cut, "tensors do not match"), (foreign, "not an lmforge quantized")]:
        with pytest.raises(InputError, match=message) as error:
            open_quantized(bad)
        assert "\n" not in str(error.value)
    with pytest.raises(InputError, match=r"foreign\.safetensors"):
        lmforge.load(str(foreign))  # not taken for a quantized file


# -------------------------------------------------------------------------------------- stage

@pytest.fixture(scope="module")
def run_dir(trained_run: Path) -> Path:
    return trained_run


def _config(run: Path, out: Path, **overrides) -> QuantizeConfig:
    values = dict(checkpoint=str(run), out=str(out), group_size=32, batch_size=4, eval_batches=2,
                  calibration_batches=2, dtype="bf16", progress=False)
    return QuantizeConfig(**{**values, **overrides})


@pytest.mark.parametrize(("mode", "method"), [("int8", "rtn"), ("int4", "gptq"),
                                              ("int4", "awq")])
def test_quantize_stage_end_to_end(run_dir: Path, tmp_path, mode: str, method: str) -> None:
    report = quantize(_config(run_dir, tmp_path / "q.safetensors", mode=mode, method=method))
    assert (report["mode"], report["method"], report["dtype"]) == (mode, method, "bf16")
    assert report["group_size"] == (32 if mode == "int4" else None)
    assert report["file_bytes"] == (tmp_path / "q.safetensors").stat().st_size
    assert report["file_bytes"] < report["fp32_weights_bytes"] < report["checkpoint_file_bytes"]
    assert report["quantized_layers_bytes"] < report["quantized_layers_fp32_bytes"] / 3.5
    assert abs(report["bpb_change_pct"]) < 1.0, report
    assert report["val_bpb_after"] == pytest.approx(report["val_bpb_before"], rel=0.02)
    calibration = report["calibration_tokens"]
    assert (calibration is None) == (method == "rtn")
    assert calibration is None or calibration[0] >= report["eval_tokens"][1]  # disjoint
    model, tok = lmforge.load(report["out"])  # self-contained: model, tokenizer, dtype
    kind = Int8Linear if mode == "int8" else Int4Linear
    assert sum(isinstance(m, kind) for m in model.modules()) == 7 * TINY_MODEL["n_layers"]
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert tok.fingerprint == Tokenizer.load(run_dir / "tokenizer.lmforge.json").fingerprint
    with pytest.raises(InputError, match="already quantized"):
        quantize(_config(Path(report["out"]), tmp_path / "again.safetensors"))


def test_cli_quantize_then_generate_from_the_file(run_dir: Path, tmp_path, capsys) -> None:
    out = tmp_path / "model.int4.pt"  # recognized by its content, whatever its name
    assert main(["quantize", "--checkpoint", str(run_dir), "--out", str(out), "--group-size",
                 "64", "--batch-size", "4", "--eval-batches", "2", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["mode"], report["method"], report["group_size"]) == ("int4", "rtn", 64)
    assert main(["generate", "--checkpoint", str(out), "--prompt", "the model",
                 "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("the model")


def test_calibration_windows_come_after_the_evaluation_windows(tmp_path) -> None:
    write_shard(tmp_path / "val_00000.bin", [np.arange(2000)], np.dtype(np.uint16))
    shards = [{"path": "val_00000.bin", "split": "val", "tokens": 2000, "documents": 1}]
    write_manifest(tmp_path, {"shards": shards, **totals(shards)})
    ids, (start, end) = calibration_batches(tmp_path, 4, 50, 3, first_token=801)
    assert len(ids) == 3 and ids[0].shape == (4, 50)
    positions = torch.cat(ids).flatten()  # token value = stream position
    assert (start, end) == (positions.min().item(), positions.max().item() + 1) == (1200, 1800)
    with pytest.raises(InputError, match="too small"):
        calibration_batches(tmp_path, 4, 50, 3, first_token=1201)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"mode": "int3"}, "mode"), ({"method": "smoothquant"}, "method"),
    ({"mode": "int8", "method": "gptq"}, "int4 codes"), ({"group_size": 0}, "group_size"),
    ({"checkpoint": ""}, "checkpoint"), ({"eval_batches": 0}, "eval_batches")])
def test_bad_config_values(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        QuantizeConfig(**{"checkpoint": "run", "out": "q.safetensors", **overrides})


def test_missing_data_dir_is_named(run_dir: Path, tmp_path) -> None:
    with pytest.raises(InputError, match="nowhere: not a prepared data directory"):
        quantize(_config(run_dir, tmp_path / "q", data=str(tmp_path / "nowhere")))
    ckpt = next((run_dir / "checkpoints").glob("*.pt"))  # a checkpoint outside its run: no
    lone = tmp_path / "lone" / "checkpoints"  # config.json saying which data it trained on
    lone.mkdir(parents=True)
    (lone / ckpt.name).write_bytes(ckpt.read_bytes())
    (lone.parent / "tokenizer.lmforge.json").write_bytes(
        (run_dir / "tokenizer.lmforge.json").read_bytes())
    with pytest.raises(ConfigError, match="give --data"):
        quantize(_config(lone / ckpt.name, tmp_path / "q"))
    with pytest.raises(SystemExit):  # argparse rejects an unknown choice
        main(["quantize", "--checkpoint", str(run_dir), "--out", "q", "--method", "smoothquant"])
