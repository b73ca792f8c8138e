"""Offline distillation: the teacher runs once, training reads its top-k log-probabilities.

Modules, in the order a run uses them: ``precompute`` (``distill precompute``), ``store`` (the memory-mapped shards).
"""
