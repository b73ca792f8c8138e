"""``distill train`` and what outlives a run.

Modules, in the order a run uses them: ``train`` (config, the loop, accelerate/DeepSpeed set-up, signals),
``checkpoint`` (atomic, self-validating checkpoints and rotation), ``export`` (``distill export``: a Hugging Face
directory from any checkpoint, ZeRO shards consolidated).
"""
