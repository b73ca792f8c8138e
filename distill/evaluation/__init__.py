"""Held-out figures of a student.

Modules: ``metrics`` (token KL, top-1 agreement, CE, answer accuracy; used during training), ``embedding`` (the same
for encoder students), ``command`` (``distill eval``), ``speculative`` (the student as the speculative-decoding draft
of its teacher), ``plot`` (``distill plot``).
"""
