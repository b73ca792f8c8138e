"""Orchestration that uses both stages; nothing imports it.

Modules: ``cli`` (the ``distill`` and ``data-gen`` subcommand tables), ``quickstart`` (teacher -> ``data-gen cot`` ->
``distill prune`` -> three students on text and one on-policy -> ``distill eval``, on a built-in task), with its
settings in ``quickstart_config`` and its stages in ``quickstart_stages``, ``report`` (the quickstart's report and
plots), ``lion`` (the Lion adversarial loop: data generation with a student trained in the loop).
"""
