"""Everything between a model and its tokens: the decode engine, its step functions and CUDA graphs,
sampling, speculative decoding, beam search and the Triton kernels it swaps into a model
(kernels/). The model code (tformer.nn, tformer.models) knows nothing of it. The kernels' shared
invariants are in README.md beside this file.
"""

from tformer.inference.beam import BeamConfig, BeamResult, beam_search
from tformer.inference.engine import DecodeEngine, EngineOptions, generate
from tformer.inference.sampling import SamplingConfig, sample
from tformer.inference.speculative import SpecStats, speculative_generate
from tformer.inference.text import generate_text, load_tokenizer, speculative_text

__all__ = ["BeamConfig", "BeamResult", "DecodeEngine", "EngineOptions", "SamplingConfig", "SpecStats", "beam_search",
           "generate", "generate_text", "load_tokenizer", "sample", "speculative_generate", "speculative_text"]
