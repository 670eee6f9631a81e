"""Weight-only quantization as a module swap (the model code knows nothing of it).

    model = tformer.load(path)
    quantize_model(model, "int4", group_size=64)   # nn.Linear -> Int4Linear, in place
    tformer.save(model, out)                        # tformer.json records the spec
    tformer.load(out)                               # the same quantized model

int8: per-output-channel symmetric scales (Int8Linear). int4: asymmetric groups along the
input dimension, two weights a byte (Int4Linear; PyTorch's tinygemm kernel on CUDA + bf16).
"""

from tformer.quantize.int4 import GROUP_SIZES, Int4Linear, dequantize_int4, pack_int4, quantize_int4, unpack_int4
from tformer.quantize.int8 import Int8Linear, dequantize_int8, quantize_int8
from tformer.quantize.swap import MODES, apply_spec, is_quantized, plan, quantization_spec, quantize_model

__all__ = [
    "GROUP_SIZES", "MODES", "Int4Linear", "Int8Linear",
    "apply_spec", "dequantize_int4", "dequantize_int8", "is_quantized", "pack_int4", "plan",
    "quantization_spec", "quantize_int4", "quantize_int8", "quantize_model", "unpack_int4",
]
