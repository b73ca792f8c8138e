"""Feature- and relation-based distillation losses (hidden states, attention maps, MiniLM relations, RKD, ...).

The trainer uses :class:`FeatureDistiller` with a :class:`FeatureSettings` config section (the terms' names and what
each needs are in :mod:`distill.losses.registry`); the loss functions in the submodules are plain tensor functions
usable on their own. See ``docs/features.md``.
"""

from distill.losses.features.distiller import FeatureDistiller, FeatureSettings

__all__ = ["FeatureDistiller", "FeatureSettings"]
