"""Held-out figures of a student.

Modules: ``evaluator`` (the figures a training run logs, with equal batch counts on every rank), ``metrics`` (token KL,
top-1 agreement, CE through the chunked kernels, answer accuracy), ``embedding`` (the same for encoder students),
``command`` (``distill eval``), ``speculative`` (the student as the speculative-decoding draft of its teacher),
``plot`` (``distill plot``).
"""
