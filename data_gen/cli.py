"""``data-gen`` command line; the same subcommand-map design as ``distill.cli``."""

from __future__ import annotations

import sys

from distill.cli import dispatch

# name -> (module:function, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "cot": ("data_gen.cot:main", "chain-of-thought rationales checked against gold answers or a majority vote (STaR)"),
    "lion": ("data_gen.lion:main", "Lion adversarial distillation loop: imitation, discrimination, generation"),
    "dedup": ("data_gen.dedup:main", "drop near-duplicate records of a JSONL file by exact ROUGE-L (greedy, in order)"),
    "self-instruct": ("data_gen.self_instruct:main", "bootstrap instructions from seed tasks with a teacher (Self-Instruct)"),
}


def main(argv: list[str] | None = None) -> int:
    return dispatch("data-gen", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
