from tformer.models.build import build_model, count_parameters
from tformer.models.decoder import Decoder

__all__ = ["Decoder", "build_model", "count_parameters"]
