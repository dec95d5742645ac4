"""TalkFormer core: landmark-based latent diffusion for lip-synced talking faces.

Never imports ComfyUI. Importing this package is cheap: submodules load torch, mediapipe and
PyAV only when imported themselves.
"""
__version__ = "0.1.0"
