"""Adapters on a loaded SDXL model: LoRA and LyCORIS files (lora), textual-inversion embeddings (embeddings),
a prompt's `<lora:NAME:W>` tags (tags), and applying a set of them (apply)."""
