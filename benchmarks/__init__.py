"""Benchmarks of peft-apt and the baselines they compare APT with.

The offline models and data come from `examples.offline`.
"""
