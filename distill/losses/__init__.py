"""Loss terms and the objective that combines them.

Modules, in the order a step uses them: ``registry`` (every term of ``loss.terms``: its name, whether it is
token-level, what it needs, and its code; ``loss.terms`` is validated against it), ``objective`` (which terms are
computed from what, and how each is normalised), ``head`` (each model's own output head: bias, scale, soft-cap),
``kinds`` (the divergences, one row each, and the ``DivergenceSpec`` every divergence function takes),
``divergences`` (logit divergences and the chunked kernels whose gradient is computed in the forward pass), ``topk``
(divergences against an offline top-k store), ``cross`` (ULD and GOLD across tokenizers, at aligned positions),
``features`` (hidden-state, attention and relation terms), ``logprobs`` (log-probabilities of given tokens, chunked:
on-policy figures).
"""
