"""Pruning a teacher into a real smaller Hugging Face model, or into a sparse dense one.

Modules, in the order a run uses them: ``families`` (supported layouts), ``calibration`` (user data),
``importance`` (Minitron activations, Block Influence, Wanda norms; cached), ``structured`` (plan + smaller model),
``unstructured`` (Wanda/magnitude/N:M masks), ``masked`` (the masked-teacher reference), ``report``, ``command``.
"""
