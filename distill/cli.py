"""``distill`` command line: one entry point, a subcommand map, each subcommand a module with ``main(argv)``.

Subcommands are imported lazily so ``distill --help`` stays fast and a missing optional dependency of one command
does not break the others. ``tests/test_cli.py`` checks that every entry resolves to a callable.
"""

from __future__ import annotations

import importlib
import sys

from distill.configuration import run_command

# name -> (module:function, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("distill.quickstart:main", "train a tiny teacher, distil a student, report before/after (no downloads)"),
    "train": ("distill.train:main", "distil a teacher into a student from a YAML config (run under accelerate launch)"),
    "precompute": ("distill.precompute:main", "run the teacher once over a dataset and store its top-k log-probabilities for offline distillation"),
    "prune": ("distill.prune.command:main", "prune a teacher into a smaller HF model (depth/heads/MLP/hidden) or sparsify it (Wanda, N:M)"),
    "eval": ("distill.eval_cmd:main", "task accuracy (greedy generation), perplexity, tokens/s, and KL/top-1 agreement with a teacher"),
    "plot": ("distill.plot:main", "draw a run's logged training/eval curves (metrics.jsonl) as PNG files"),
    "export": ("distill.export:main", "write a training checkpoint's student (ZeRO shards consolidated) as a HF model directory"),
}


def print_help(prog: str, commands: dict[str, tuple[str, str]]) -> None:
    print(f"usage: {prog} <command> [--config FILE] [--field value ...]\n\ncommands:")
    width = max(len(name) for name in commands)
    for name, (_, summary) in commands.items():
        print(f"  {name:<{width}}  {summary}")
    print(f"\nRun '{prog} <command> --help' for the fields of a command.")


def dispatch(prog: str, commands: dict[str, tuple[str, str]], argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print_help(prog, commands)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in commands:
        import difflib

        close = difflib.get_close_matches(name, list(commands), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        print(f"error: unknown command '{name}'{hint} (see '{prog} --help')", file=sys.stderr)
        return 2
    module_name, func_name = commands[name][0].split(":")
    main = getattr(importlib.import_module(module_name), func_name)
    return run_command(main, rest)


def main(argv: list[str] | None = None) -> int:
    return dispatch("distill", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
