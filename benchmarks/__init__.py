"""Benchmark infrastructure for peft-apt: an offline pretrained backbone, small datasets and baselines."""
