"""Training data: records to tokenised examples to per-rank batches.

Modules, in the order a run uses them: ``datasets`` (shape detection, chat template, prompt masking, collation),
``tokenized`` (each file tokenized once into memory-mapped Arrow files that every run and process maps),
``batching`` (a deterministic per-rank batch stream whose position is a sample count, so resume is exact),
``synthetic`` (the quickstart's built-in multi-step arithmetic task).
"""
