"""Shared infrastructure of both stages; it imports nothing else of the project.

Modules, in the order a command uses them: ``config`` (typed dataclass configs: YAML, dotted CLI overrides,
validation, resolved save with secrets redacted), ``redact`` (URL credentials masked in saved configs and printed
lines, server messages scrubbed of keys, a key given where its variable's name belongs refused), ``commands`` (the
command contract ``Config``/``run``/``main``, exit codes and stop reasons, the one-line error guard, subcommand
dispatch), ``ownership`` (the one output-directory flow, ``prepare``: the marker naming the command that owns a
directory, each command declaring what it writes; resume only its own output, ``--overwrite`` only what it wrote),
``dirlock`` (one writer per output directory: an advisory lock the kernel drops with its process), ``records`` (reading
users' JSON-lines/JSON/parquet/``datasets`` files with file:line errors), ``pretrained`` (models and tokenizers from a
directory or a GGUF file, as plain transformers models), ``generation`` (batched, left-padded greedy or sampled
generation with a local model: ``distill eval``, the trainer's accuracy metric, ``data-gen``'s local teacher),
``answers`` (final-answer extraction and normalisation, and the one ``extractor`` config section of ``data-gen cot``,
``distill eval`` and the trainer's accuracy metric), ``atomic`` (every result and progress file written atomically and
fsynced: temporary sibling, ``os.replace``, directory fsync), ``checksum`` (content hashes of checkpoint files, store
shards and journal lines).
"""
