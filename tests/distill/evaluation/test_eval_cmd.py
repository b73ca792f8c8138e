"""``distill eval``: figures on tiny local models, accuracy from the model's own greedy generations, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from distill.evaluation.command import EvalConfig, run
from kd_core.answers import AnswerExtractor
from kd_core.generation import encode_prompt, generate_batched
from kd_recipes.cli import distill_main as cli

PROBLEMS = [(a, b) for a in range(2, 8) for b in range(1, 3)]  # 12 records


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {
                    "prompt": f"Ana has {a} pens and buys {b} more. How many?",
                    "completion": f"{a} + {b} = {a + b}\nThe answer is {a + b}.",
                }
            )
            + "\n"
            for a, b in PROBLEMS
        )
    )
    return path


def test_command_writes_sane_json_and_prints_a_table(model_dirs, data_file, tmp_path, capsys):
    out = tmp_path / "figures.json"
    code = cli(
        [
            "eval",
            str(model_dirs["student"]),
            "--data",
            str(data_file),
            "--teacher",
            str(model_dirs["teacher"]),
            "--max_new_tokens",
            "8",
            "--batch_size",
            "5",
            "--output",
            str(out),
        ]
    )
    assert code == 0
    figures = json.loads(out.read_text())
    assert figures["records"] == len(PROBLEMS) == figures["scored"] == len(figures["samples"])
    assert figures["kl"] > 0 and 0.0 <= figures["top1_agreement"] <= 1.0
    assert figures["perplexity"] == pytest.approx(math.exp(figures["loss"]))
    assert figures["perplexity"] > 10  # a random model over a 300-token vocabulary is far from certain
    assert figures["tokens_per_second"] > 0 and 0 < figures["generated_tokens"] <= 8 * len(PROBLEMS)
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(model_dirs["student"])
    assert figures["parameters"] == sum(p.numel() for p in student.parameters())
    assert all(s["gold"] == str(a + b) for s, (a, b) in zip(figures["samples"], PROBLEMS))
    assert figures["accuracy"] == sum(s["correct"] for s in figures["samples"]) / len(PROBLEMS)
    table = capsys.readouterr().out
    assert "accuracy" in table and "tokens_per_second" in table and "student" in table


def test_accuracy_is_computed_from_the_generations(model_dirs, tmp_path):
    """Gold answers set to the model's own greedy first line for half the records: accuracy must be exactly 1/2."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_dirs["student"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    prompts = [f"What is {a} plus {b}?" for a, b in PROBLEMS]
    texts = greedy_texts(model, tokenizer, prompts, max_new_tokens=6, batch_size=4)
    # split("\n"), not splitlines(): random tokens decode to bytes such as \x1e that splitlines() also breaks at
    first_lines = [t.strip().split("\n")[0].strip() for t in texts]
    assert all(first_lines), "the tiny model must generate some text for this test"
    records = [
        {"prompt": p, "completion": "x", "label": line if i % 2 == 0 else line + " and more"}
        for i, (p, line) in enumerate(zip(prompts, first_lines))
    ]
    data = tmp_path / "own.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    # The whole (trimmed) first line is the answer, compared as text.
    extractor = AnswerExtractor("regex", r"\A\s*(?P<answer>[^\n]+)", numeric=False)
    figures = run(EvalConfig(model=str(path), data=str(data), max_new_tokens=6, batch_size=3, extractor=extractor))
    assert figures["accuracy"] == 0.5
    assert [s["correct"] for s in figures["samples"]] == [i % 2 == 0 for i in range(len(PROBLEMS))]
    assert figures["kl"] is None and figures["top1_agreement"] is None  # no teacher given


def test_gsm8k_shape_and_text_shape(model_dirs, tmp_path):
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "Tom has 3 and gets 4. How many?", "answer": "3 + 4 = 7\n#### 7"}) + "\n")
    figures = run(EvalConfig(model=str(model_dirs["student"]), data=str(gsm), max_new_tokens=4))
    assert figures["samples"][0]["gold"] == "7" and figures["scored"] == 1
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "plain text has no prompt and no answer"}) + "\n")
    figures = run(EvalConfig(model=str(model_dirs["student"]), data=str(text), max_new_tokens=4))
    assert figures["accuracy"] is None and figures["tokens_per_second"] is None and figures["perplexity"] > 1


def test_batching_does_not_change_generations(model_dirs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dirs["student"])
    model = AutoModelForCausalLM.from_pretrained(model_dirs["student"]).eval()
    prompts = ["Hi", "What is 12 plus 7? Tell me quickly.", "List three colors"]
    torch.manual_seed(0)
    batched = greedy_texts(model, tokenizer, prompts, max_new_tokens=5, batch_size=3)
    single = [greedy_texts(model, tokenizer, [p], max_new_tokens=5, batch_size=1)[0] for p in prompts]
    assert batched == single  # left padding with the attention mask leaves each continuation unchanged


def test_generation_counts_tokens_and_restores_the_padding_side(model_dirs):
    """Answers come back in prompt order (batches are length-sorted), cut at EOS, with their token counts; the
    tokenizer's padding side is what it was before."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dirs["student"])
    model = AutoModelForCausalLM.from_pretrained(model_dirs["student"]).eval()
    tokenizer.padding_side = "right"
    prompts = [encode_prompt(tokenizer, p) for p in ["What is 12 plus 7? Tell me quickly.", "Hi"]]
    assert prompts[1] == encode_prompt(tokenizer, [{"role": "user", "content": "Hi"}])  # a user turn
    generations, seconds = generate_batched(model, tokenizer, prompts, max_new_tokens=4, batch_size=2)
    assert tokenizer.padding_side == "right" and seconds > 0
    assert [g.prompt_tokens for g in generations] == [len(p) for p in prompts]
    for g in generations:
        assert (g.new_tokens < 4) if g.stopped else (g.new_tokens == 4)


def greedy_texts(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    generations, _ = generate_batched(
        model, tokenizer, [encode_prompt(tokenizer, p) for p in prompts], max_new_tokens, batch_size
    )
    return [g.text for g in generations]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--extractor.kind", "regex", "--extractor.regex", "(unclosed"], "does not compile"),
        (["--extractor.kind", "guess"], "extractor.kind"),
        (["--max_new_tokens", "0"], "max_new_tokens"),
    ],
)
def test_bad_settings_exit_2(model_dirs, data_file, extra, message, capsys):
    assert cli(["eval", str(model_dirs["student"]), "--data", str(data_file), *extra]) == 2
    assert message in capsys.readouterr().err


def test_bad_paths_exit_2(model_dirs, data_file, tmp_path, capsys):
    assert cli(["eval", str(tmp_path / "nothing"), "--data", str(data_file)]) == 2
    assert "not a model directory" in capsys.readouterr().err
    assert cli(["eval", str(model_dirs["student"]), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "not found" in capsys.readouterr().err
    existing = tmp_path / "taken.json"
    existing.write_text("{}")
    assert cli(["eval", str(model_dirs["student"]), "--data", str(data_file), "--output", str(existing)]) == 2
    assert "already exists" in capsys.readouterr().err and existing.read_text() == "{}"


def test_a_bad_row_is_named_by_file_and_line(model_dirs, tmp_path, capsys):
    data = tmp_path / "held.jsonl"
    # A blank line, and a number where text belongs in a column whose other rows are text.
    data.write_text('{"prompt": "What is 1 plus 1?", "completion": "2"}\n\n{"prompt": 7, "completion": "3"}\n')
    assert cli(["eval", str(model_dirs["student"]), "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {data}:3: field 'prompt': expected a string"), err[-1]
    data.write_text('{"prompt": "What is 1 plus 1?", "completion": "2"}\n{"prompt": "x", \n')
    assert cli(["eval", str(model_dirs["student"]), "--data", str(data)]) == 2
    assert f"{data}:2" in capsys.readouterr().err
