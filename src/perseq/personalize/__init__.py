"""Per-user adaptation at inference (PCRec-simple): ``Personalized(model, AdaptConfig(...))``
scores like the model it wraps, after adapting to each user's own history. See simple.py."""
from .simple import AdaptConfig, PCRecSimple, Personalized

__all__ = ["AdaptConfig", "PCRecSimple", "Personalized"]
