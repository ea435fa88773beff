from .base import SeqRecModel
from .registry import MODELS, build_model, model_class

__all__ = ["MODELS", "SeqRecModel", "build_model", "model_class"]
