"""Training: the progressive latent curriculum on Accelerate (``ivtlr train``)."""
from .trainer import Progress, Trainer, TrainResult, train

__all__ = ["Progress", "TrainResult", "Trainer", "train"]
