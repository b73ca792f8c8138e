"""Teacher-driven dataset generation: Self-Instruct and verified chain-of-thought rationales (the Lion loop, which
also trains, is orchestration in ``kd_recipes.lion``).

Modules, in the order a run uses them: ``config`` (the ``teacher:`` and ``output:`` sections), ``engine`` (concurrency,
rate limits, retries, budget, cost), ``limiter``, ``backends`` (the ``openai`` client or a local transformers model),
``cache`` (every answer, per call), ``driver`` (output directory, resume, journal, signals, stop codes: what every
method shares), ``journal``, the methods ``self_instruct`` and ``cot`` (with the novelty filter ``rouge`` and
``data-gen dedup`` in ``dedup``), ``output`` (data files and dataset card), ``testing`` (loopback servers for tests
and benchmarks).
"""
