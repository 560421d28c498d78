"""The networks of SDXL: UNet, VAE, text encoders and tokenizer, prompt weighting, the conditioner, a whole checkpoint
as one module."""
