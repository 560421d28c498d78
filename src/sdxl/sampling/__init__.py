"""Noise schedules and samplers as pure functions over a denoiser."""
