"""The student: loaded from a directory or built from the teacher's config, pruned from the teacher, trained with LoRA
or kept sparse.

Modules, in the order a run uses them: ``models`` (teacher, student and tokenizer loading with the pre-training
checks), ``prune`` (``distill prune``: structured and unstructured pruning into real Hugging Face models),
``lora`` (peft adapters and merges that keep sparsity), ``sparsity`` (masks re-applied after each optimizer step),
``tiny`` (tokenizers and tiny models built locally for the quickstart and the tests).
"""
