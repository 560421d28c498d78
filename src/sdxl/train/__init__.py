"""Training: `sdxl train CONFIG.toml` (config.py: settings; data.py: images and buckets; loop.py: the loop;
checkpointing.py: atomic checkpoints and resume)."""

from sdxl.train.config import TrainConfig, load
from sdxl.train.loop import train

__all__ = ["TrainConfig", "load", "train"]
