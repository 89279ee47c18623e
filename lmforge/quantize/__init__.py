"""Weight-only post-training quantization of a built model (gpt-fast style).

The model file knows nothing about this: the transforms here walk a built
:class:`~lmforge.model.Transformer` and swap its ``nn.Linear`` layers in place for integer ones.
Activations stay in floating point; the LM head and embeddings stay float.

- :mod:`.layers` — :class:`Int8Linear` (one symmetric scale per output channel) and
  :class:`Int4Linear` (one symmetric float16 scale per ``group_size`` input columns, two codes
  per byte). With bf16 activations on CPU they run PyTorch's fused weight-only kernels
  (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``, the int4 tile layout cached per
  layer); otherwise they dequantize and call ``F.linear``.
- :mod:`.rtn` — :func:`quantize_model`: round to nearest.
- :mod:`.gptq` — :func:`gptq_quantize_model`: GPTQ (arXiv:2210.17323), int4 codes chosen to
  keep each layer's output on calibration data.
- :mod:`.awq` — :func:`awq_scale_model`: AWQ (arXiv:2306.00978) activation-aware scales folded
  into the float weights before either quantizer.
- :mod:`.calibration` — calibration batches (disjoint from evaluation) and hooked passes.
- :mod:`.io` — one self-contained safetensors file (:func:`save_quantized`,
  :func:`open_quantized`, which ``lmforge.load`` uses) and :func:`size_report`.
- :mod:`.stage` — :class:`QuantizeConfig` and :func:`quantize`, the ``lmforge quantize`` stage.
"""

from lmforge.quantize.awq import awq_scale_model
from lmforge.quantize.gptq import gptq_quantize_model, gptq_quantize_weight
from lmforge.quantize.io import (
    SizeReport,
    load_quantized,
    open_quantized,
    quantization_of,
    quantized_metadata,
    save_quantized,
    size_report,
)
from lmforge.quantize.layers import (
    MODES,
    Int4Linear,
    Int8Linear,
    Mode,
    fake_quantize,
    pack_int4,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)
from lmforge.quantize.rtn import quantizable_linears, quantize_model
from lmforge.quantize.stage import QuantizeConfig, quantize

__all__ = ["MODES", "Int4Linear", "Int8Linear", "Mode", "QuantizeConfig", "SizeReport",
           "awq_scale_model", "fake_quantize", "gptq_quantize_model",
           "gptq_quantize_weight", "load_quantized", "open_quantized", "pack_int4",
           "quantizable_linears", "quantization_of", "quantize", "quantize_int4", "quantize_int8",
           "quantize_model", "quantized_metadata", "save_quantized", "size_report",
           "unpack_int4"]
