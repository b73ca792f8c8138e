"""``distill train`` and what outlives a run.

Modules, in the order a run uses them: ``train`` (config, set-up, the step and the loop, signals), ``runtime`` (the
workarounds for accelerate, DeepSpeed and torch.distributed, each naming its version: the Accelerator, ZeRO-3
registration and gathering, the process exit), ``on_policy`` (micro-batches whose completions the student or the
teacher samples, with the sampler's checkpointed state), ``teacher`` (the teacher signal of each step: an online model or an
offline top-k store), ``checkpoint`` (atomic, self-validating checkpoints and rotation), ``export`` (``distill
export``: a Hugging Face directory from any checkpoint, ZeRO shards consolidated).
"""
