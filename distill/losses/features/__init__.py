"""Feature- and relation-based distillation losses (hidden states, attention maps, MiniLM relations, RKD, ...).

The trainer uses :class:`FeatureDistiller` with a :class:`FeatureSettings` config section; the loss functions in the
submodules are plain tensor functions usable on their own. See ``docs/features.md``.
"""

from distill.losses.features.distiller import FEATURE_TERMS, FeatureDistiller, FeatureSettings

__all__ = ["FEATURE_TERMS", "FeatureDistiller", "FeatureSettings"]
