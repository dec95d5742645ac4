"""Standalone training (autoencoder and TalkFormer stages; one process or torchrun DDP). See loop.py."""
from .batching import StepBatchSampler
from .loop import TrainResult, train
from .options import TrainOptions

__all__ = ["train", "TrainOptions", "TrainResult", "StepBatchSampler"]
