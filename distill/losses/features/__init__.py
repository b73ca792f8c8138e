"""Feature- and relation-based distillation losses (hidden states, attention maps, MiniLM relations, RKD, ...).

The trainer uses :class:`FeatureDistiller` with a :class:`FeatureSettings` config section (the terms' names, needs
and functions are in :mod:`distill.losses.registry`, the functions themselves in :mod:`.terms`); the loss functions
in the submodules are plain tensor functions usable on their own. See ``docs/features.md``.
"""

from __future__ import annotations

__all__ = ["FeatureDistiller", "FeatureSettings"]


def __getattr__(name: str):
    # Imported on first use (PEP 562): the registry imports the term functions of this package, and the distiller
    # imports the registry, so an eager import here would be circular.
    if name in __all__:
        from distill.losses.features import distiller

        return getattr(distiller, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
