"""Training: `sdxl train CONFIG.toml` (config.py: settings; data.py: images and buckets; loop.py: the loop;
checkpointing.py: atomic checkpoints and resume)."""

from .config import TrainConfig, load
from .loop import train

__all__ = ["TrainConfig", "load", "train"]
