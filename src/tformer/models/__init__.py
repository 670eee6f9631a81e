from tformer.models.build import build_model, count_parameters
from tformer.models.decoder import Decoder
from tformer.models.fused import with_decode_kernels, without_decode_kernels

__all__ = ["Decoder", "build_model", "count_parameters", "with_decode_kernels", "without_decode_kernels"]
