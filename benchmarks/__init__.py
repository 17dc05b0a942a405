"""Benchmarks of peft-apt and the baselines they compare APT with; the offline models and data come from `examples.offline`."""
