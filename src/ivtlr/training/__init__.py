"""Training: the progressive latent curriculum on Accelerate (``ivtlr train``)."""
from .trainer import Trainer, TrainResult, train

__all__ = ["TrainResult", "Trainer", "train"]
