"""The project's own laboratory: the synthetic world, the judge, the default model's recipe and `sdxl eval`."""
