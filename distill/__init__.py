"""Distillation of a teacher into a smaller student, stage by stage (each subpackage lists its modules in the order a
run uses them): ``student`` (loading models, pruning, LoRA, sparsity), ``data`` (datasets, deterministic batches),
``losses`` (logit divergences and their chunked kernels, top-k offline terms, feature and relation terms, the
objective), ``offline`` (teacher top-k store and ``distill precompute``), ``training`` (``distill train``, checkpoints,
``distill export``), ``evaluation`` (metrics, ``distill eval``, ``distill plot``).
"""

__version__ = "0.1.0"
