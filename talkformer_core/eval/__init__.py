"""Evaluation: the paper's Table I metrics on the lower half of the face crop, and the CLI.

``metrics`` (PSNR, SSIM, LMD, mouth opening; ``score_crops``, ``evaluate_pair``) needs numpy,
scipy and mediapipe; the metric networks live in their own modules and load only users' files:
``lpips`` (AlexNet/VGG16 + v0.1 heads), ``fid`` (pytorch-fid's Inception), ``syncnet`` (SyncNet
v2), ``csim`` (dlib ResNet). ``python -m talkformer_core.eval`` is ``cli``.
"""
from .metrics import (
    CropScorer,
    evaluate_pair,
    lip_distance,
    lower_half,
    mouth_opening,
    pearson,
    psnr,
    score_crops,
    ssim,
)

__all__ = ["CropScorer", "evaluate_pair", "lip_distance", "lower_half", "mouth_opening", "pearson", "psnr",
           "score_crops", "ssim"]
