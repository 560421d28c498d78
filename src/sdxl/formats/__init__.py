"""Files: checkpoints (single-file, diffusers), the name-conversion table, LoRA files, PNG infotext and recipes."""
