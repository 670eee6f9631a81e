from tformer.generate.sampling import SamplingConfig, sample
from tformer.generate.engine import generate

__all__ = ["SamplingConfig", "generate", "sample"]
