"""Shared infrastructure of both stages; it imports nothing else of the project.

Modules, in the order a command uses them: ``config`` (typed dataclass configs: YAML, dotted CLI overrides,
validation, resolved save with secrets redacted), ``commands`` (exit codes, the one-line error guard, subcommand
dispatch), ``records`` (reading users' JSON-lines/JSON/parquet/``datasets`` files with file:line errors),
``answers`` (final-answer extraction and normalisation, used by ``data-gen cot`` and by accuracy evaluation).
"""
