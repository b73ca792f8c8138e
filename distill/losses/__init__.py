"""Loss terms and the objective that combines them.

Modules, in the order a step uses them: ``objective`` (which terms are computed from what, weighted and summed),
``divergences`` (logit divergences and the chunked kernel whose gradient is computed in the forward pass),
``topk`` (divergences against an offline top-k store), ``features`` (hidden-state, attention and relation terms).
"""
