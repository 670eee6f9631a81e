from tformer.models.build import build_model, count_parameters
from tformer.models.decoder import Decoder
from tformer.models.encoder import (
    Encoder,
    MaskedLM,
    Pretraining,
    QuestionAnswering,
    SequenceClassifier,
    TokenClassifier,
)

__all__ = [
    "Decoder",
    "Encoder",
    "MaskedLM",
    "Pretraining",
    "QuestionAnswering",
    "SequenceClassifier",
    "TokenClassifier",
    "build_model",
    "count_parameters",
]
