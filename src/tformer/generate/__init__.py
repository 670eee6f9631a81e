from tformer.generate.captured import CapturedDecode, CapturedPrefill
from tformer.generate.engine import compiled_decode_step, compiled_prefill, generate
from tformer.generate.sampling import SamplingConfig, sample
from tformer.generate.speculative import SpecStats, speculative_generate

__all__ = ["CapturedDecode", "CapturedPrefill", "SamplingConfig", "SpecStats", "compiled_decode_step", "compiled_prefill", "generate", "sample", "speculative_generate"]
