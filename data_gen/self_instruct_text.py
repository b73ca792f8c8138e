"""The text side of ``data-gen self-instruct`` (:mod:`data_gen.self_instruct`): the prompts it sends, the parsers
of the teacher's answers, and the rule-based filters an instruction passes before the ROUGE-L novelty check (with
their settings, :class:`FilterConfig`, the ``filters`` section of the command's config).

Pure functions of text: the pipeline in :mod:`data_gen.self_instruct` calls them; the tests call them directly.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from data_gen.engine import ParseError
from kd_core.config import option

DEFAULT_BLACKLIST = [
    "image",
    "images",
    "graph",
    "graphs",
    "picture",
    "pictures",
    "file",
    "files",
    "map",
    "maps",
    "draw",
    "plot",
    "go to",
    "video",
    "audio",
    "music",
    "flowchart",
    "diagram",
]


@dataclass
class FilterConfig:
    """Which generated instructions are kept."""

    min_words: int = option(3, help="drop instructions with fewer words")
    max_words: int = option(150, help="drop instructions with more words")
    blacklist: list[str] = option(DEFAULT_BLACKLIST, help="drop instructions containing any of these words/phrases")
    banned_prefixes: list[str] = option(["write a program"], help="drop instructions starting with these (lowercase)")
    reject_leading_punctuation: bool = option(True, help="drop instructions starting with punctuation")
    reject_non_ascii: bool = option(True, help="drop instructions starting with a non-ASCII character")
    rouge_threshold: float = option(0.7, help="keep iff ROUGE-L F to every pooled instruction <= this")

    def __post_init__(self) -> None:
        if self.min_words < 1 or self.max_words < self.min_words:
            raise ValueError("min_words: expected 1 <= min_words <= max_words")
        if not 0 < self.rouge_threshold <= 1:
            raise ValueError("rouge_threshold: expected a value in (0, 1]")


# ------------------------------------------------------------------------------------------------ prompts
GENERATE_TEMPLATE = (
    "We are collecting a varied set of tasks that people ask a text assistant to do. Below are some examples. "
    "Propose {n} new tasks that differ from the examples and from one another in topic, format and skill "
    "(writing, reasoning, classification, editing, advice, coding, maths, ...). Each task is one or two sentences "
    "and must be doable with text alone: no images, files, audio or actions in the physical world. "
    "Continue the numbered list, one task per entry, in the form 'Task N: <instruction>'.\n\n{examples}"
)
CLASSIFY_TEMPLATE = (
    "Decide whether each task is a classification task, i.e. its answer is one label from a small, fixed set of "
    "possible outputs. Answer Yes or No.\n\n{examples}Task: {instruction}\nClassification:"
)
INPUT_FIRST_TEMPLATE = (
    "Write up to {k} examples of the task below. For each, give an input and the output a careful assistant "
    "would produce. If the task needs no input, write 'Input: <none>'. Use the format of the examples.\n\n"
    "{examples}Task: {instruction}\n"
)
OUTPUT_FIRST_TEMPLATE = (
    "The task below is a classification task. First choose a possible class label, then write an input that "
    "belongs to that label; do this for up to {k} different labels. Use the format of the examples.\n\n"
    "{examples}Task: {instruction}\n"
)
TEMPLATE_HASH = hashlib.sha256(
    "\0".join([GENERATE_TEMPLATE, CLASSIFY_TEMPLATE, INPUT_FIRST_TEMPLATE, OUTPUT_FIRST_TEMPLATE]).encode()
).hexdigest()[:16]


def generation_prompt(examples: list[str], n: int) -> list[dict[str, str]]:
    listed = "".join(f"Task {i}: {text}\n" for i, text in enumerate(examples, start=1))
    return [{"role": "user", "content": GENERATE_TEMPLATE.format(n=n, examples=listed)}]


def classification_prompt(instruction: str, seeds: list[dict[str, Any]]) -> list[dict[str, str]]:
    shots = "".join(
        f"Task: {t['instruction']}\nClassification: {'Yes' if t['is_classification'] else 'No'}\n\n" for t in seeds
    )
    return [{"role": "user", "content": CLASSIFY_TEMPLATE.format(examples=shots, instruction=instruction)}]


def instance_prompt(
    instruction: str, is_classification: bool, shots: list[dict[str, Any]], k: int
) -> list[dict[str, str]]:
    blocks = []
    for task in shots:
        lines = [f"Task: {task['instruction']}"]
        for j, inst in enumerate(task["instances"], start=1):
            if is_classification:
                lines += [f"Class label: {inst['output']}", f"Input: {inst['input'] or '<none>'}"]
            else:
                lines += [f"Example {j}", f"Input: {inst['input'] or '<none>'}", f"Output: {inst['output']}"]
        blocks.append("\n".join(lines) + "\n\n")
    template = OUTPUT_FIRST_TEMPLATE if is_classification else INPUT_FIRST_TEMPLATE
    return [{"role": "user", "content": template.format(k=k, examples="".join(blocks), instruction=instruction)}]


# ------------------------------------------------------------------------------------------------ parsing
TASK_SPLIT = re.compile(r"(?:^|\n)\s*\**\s*Task\s*\d+\s*\**\s*[:.]\**", re.IGNORECASE)


def parse_instructions(text: str, finish_reason: str) -> list[str]:
    """Instructions listed as 'Task N: ...'; a list cut by the token limit loses its (possibly partial) last item."""
    pieces = TASK_SPLIT.split(text)
    items = [re.sub(r"\s+", " ", p).strip() for p in pieces[1:]]  # pieces[0] is any preamble
    if finish_reason == "length" and items:
        items = items[:-1]
    items = [i for i in items if i]
    if not items:
        raise ParseError("no_tasks")
    return items


def parse_yes_no(text: str, finish_reason: str) -> bool:
    match = re.match(r"\W*(yes|no)\b", text.strip(), re.IGNORECASE)
    if not match:
        raise ParseError("no_yes_no")
    return match.group(1).lower() == "yes"


NONE_INPUTS = {"<none>", "none", "n/a", "not applicable", "<noinput>", "no input", ""}


def _clean_input(text: str) -> str:
    text = text.strip()
    return "" if text.lower().strip(".") in NONE_INPUTS else text


def parse_instances(text: str, finish_reason: str, is_classification: bool) -> list[dict[str, str]]:
    """(input, output) pairs; output-first answers ('Class label' then 'Input') or input-first ones."""
    if is_classification:
        chunks = re.split(r"(?:^|\n)\s*Class label\s*:", text, flags=re.IGNORECASE)[1:]
        pairs = []
        for chunk in chunks:
            label, sep, rest = chunk.partition("Input:")
            if sep:
                pairs.append({"input": _clean_input(rest), "output": label.strip()})
    else:
        pairs = [{"input": given, "output": output} for given, output, _ in input_first_instances(text)]
    if finish_reason == "length" and pairs:
        pairs = pairs[:-1]  # the last one may be cut mid-sentence
    if not pairs:
        raise ParseError("no_instances")
    return pairs


EXAMPLE_SPLIT = re.compile(r"(?:^|\n)\s*Example\s*\d+\s*:?", re.IGNORECASE)
# A line that opens another field ends an output: a model that writes a second 'Output:' (SmolLM2 wrote
# 'spam\nOutput: not spam') or a new 'Input:' without an 'Example N' head has started another answer. The first output
# is kept, as Self-Instruct's own parser does.
NEXT_FIELD = re.compile(r"\n[ \t]*(?:Input|Output)[ \t]*:", re.IGNORECASE)


def input_first_instances(text: str) -> list[tuple[str, str, tuple[int, int]]]:
    """(input, output, where) of every input-first example in an answer, cut short or not: ``text[slice(*where)]``
    is the output (stripped), which is how captured log-probabilities find its tokens (:mod:`data_gen.logprobs`)."""
    heads = list(EXAMPLE_SPLIT.finditer(text))
    if heads:
        chunks = [(m.end(), nxt.start()) for m, nxt in zip(heads, heads[1:])] + [(heads[-1].end(), len(text))]
    else:
        chunks = [(0, len(text))] if "Output:" in text else []
    found = []
    for begin, end in chunks:
        head, sep, output = text[begin:end].partition("Output:")
        if sep:
            output = NEXT_FIELD.split(output, maxsplit=1)[0]
            _, _, given = head.partition("Input:")
            start = begin + len(head) + len(sep) + len(output) - len(output.lstrip())
            found.append((_clean_input(given), output.strip(), (start, start + len(output.strip()))))
    return found


def postprocess_instances(instruction: str, pairs: list[dict[str, str]], limit: int) -> list[dict[str, str]]:
    """Drop empty outputs, outputs equal to the input or the instruction, duplicates; keep the first ``limit``."""
    kept, seen = [], set()
    for pair in pairs:
        inp, out = pair["input"], pair["output"]
        key = (inp.lower(), out.lower())
        if not out or out == inp or out == instruction or inp == instruction or key in seen:
            continue
        seen.add(key)
        kept.append({"input": inp, "output": out})
    return kept[:limit]


def filter_reason(instruction: str, cfg: FilterConfig) -> str | None:
    """Why the instruction is dropped by the rule-based filters, or None when it passes them."""
    words = instruction.split()
    if len(words) < cfg.min_words:
        return "too_short"
    if len(words) > cfg.max_words:
        return "too_long"
    lowered = instruction.lower()
    for phrase in cfg.blacklist:
        if re.search(rf"\b{re.escape(phrase.lower())}\b", lowered):
            return "blacklist"
    if any(lowered.startswith(p.lower()) for p in cfg.banned_prefixes):
        return "banned_prefix"
    if cfg.reject_leading_punctuation and not instruction[0].isalnum() and not instruction[0].isspace():
        return "leading_punctuation"
    if cfg.reject_non_ascii and not instruction[0].isascii():
        return "non_ascii"
    return None
