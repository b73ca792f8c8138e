"""The two command lines, ``distill`` and ``data-gen``: one table of subcommands each, every entry a command module
with ``Config``, ``run(cfg)`` and ``main(argv)`` (see :mod:`kd_core.commands`).

The tables live here, above both packages, because two entries are orchestration that uses both stages
(``distill quickstart``, ``data-gen lion``). ``python -m distill`` and ``python -m data_gen`` come here too.
"""

from __future__ import annotations

from kd_core.commands import dispatch

# name -> (module, one-line summary)
DISTILL_COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": (
        "kd_recipes.quickstart",
        "train a tiny teacher, distil a student, report before/after (no downloads)",
    ),
    "train": (
        "distill.training.train",
        "distil a teacher into a student from a YAML config (run under accelerate launch)",
    ),
    "precompute": (
        "distill.offline.precompute",
        "run the teacher once over a dataset and store its top-k log-probabilities for offline distillation",
    ),
    "prune": (
        "distill.student.prune.command",
        "prune a teacher into a smaller HF model (depth/heads/MLP/hidden) or sparsify it (Wanda, N:M)",
    ),
    "eval": (
        "distill.evaluation.command",
        "task accuracy (greedy generation), perplexity, tokens/s, and KL/top-1 agreement with a teacher",
    ),
    "plot": ("distill.evaluation.plot", "draw a run's logged training/eval curves (metrics.jsonl) as PNG files"),
    "export": (
        "distill.training.export",
        "write a training checkpoint's student (ZeRO shards consolidated) as a HF model directory",
    ),
}

DATA_GEN_COMMANDS: dict[str, tuple[str, str]] = {
    "cot": ("data_gen.cot", "chain-of-thought rationales checked against gold answers or a majority vote (STaR)"),
    "lion": ("kd_recipes.lion", "Lion adversarial distillation loop: imitation, discrimination, generation"),
    "dedup": ("data_gen.dedup", "drop near-duplicate records of a JSONL file by exact ROUGE-L (greedy, in order)"),
    "self-instruct": (
        "data_gen.self_instruct",
        "bootstrap instructions from seed tasks with a teacher (Self-Instruct)",
    ),
}


def distill_main(argv: list[str] | None = None) -> int:
    return dispatch("distill", DISTILL_COMMANDS, argv)


def data_gen_main(argv: list[str] | None = None) -> int:
    return dispatch("data-gen", DATA_GEN_COMMANDS, argv)
