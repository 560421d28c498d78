"""Stable Diffusion XL in readable PyTorch."""

__version__ = "0.1.0"
