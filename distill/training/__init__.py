"""``distill train`` and what outlives a run.

Modules, in the order a run uses them: ``train`` (the command: ``run``, ``main``), ``config`` (``TrainConfig``, the
keyword-only ``training_config`` builder, the output-directory and tracker checks), ``setup`` (the named set-up steps:
data, models, store, objective, optimizer, teacher signal), ``loop`` (``Distiller``: the run and its loop, signals),
``step`` (one optimizer step), ``runtime`` (the workarounds for accelerate, DeepSpeed and torch.distributed, each
naming its version: the Accelerator, the process exit), ``on_policy`` (micro-batches whose completions the student or
the teacher samples, with the sampler's checkpointed state), ``teacher`` (the teacher signal of each step: an online
model or an offline top-k store), ``checkpoint`` (atomic, self-validating checkpoints, rotation and resume),
``export`` (``distill export``: a Hugging Face directory from any checkpoint, ZeRO shards consolidated; the run's
``final/``).
"""
