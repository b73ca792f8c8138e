"""Distillation trainers, losses, pruning and evaluation."""

__version__ = "0.1.0"
