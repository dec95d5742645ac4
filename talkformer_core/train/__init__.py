"""Standalone training (autoencoder and TalkFormer stages; one process or torchrun DDP). See loop.py."""
from .loop import StepBatchSampler, TrainResult, train

__all__ = ["train", "TrainResult", "StepBatchSampler"]
