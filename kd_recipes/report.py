"""The quickstart report: a markdown table of the compared models, PNG plots, and the same figures as JSON.

``write_report`` reads nothing but what the run measured (``distill eval`` results per model, the ``data-gen cot``
statistics, stage timings and each training run's ``metrics.jsonl``) and states plainly whether distillation beat
fine-tuning on gold labels only and on the teacher's rationales.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kd_core.atomic import atomic_write_json, atomic_write_text

# The compared models, in report order: (name, directory under output_dir, what it is).
MODELS = [
    ("teacher", "teacher/final", "teacher, trained on the gold rationales"),
    ("pruned", "student_init", "pruned teacher, before any training"),
    ("labels", "students/labels/final", "pruned student fine-tuned on gold answers only"),
    ("rationales", "students/rationales/final", "pruned student fine-tuned on the teacher's rationales"),
    ("distilled", "students/distilled/final", "pruned student distilled on the teacher's rationales"),
    ("on_policy", "students/on_policy/final", "rationale student continued on its own samples, scored by the teacher"),
]
# Training runs whose curves are drawn (directory under the quickstart root -> plot folder name).
RUNS = {
    "teacher": "teacher",
    "students/labels": "labels",
    "students/rationales": "rationales",
    "students/distilled": "distilled",
    "students/on_policy": "on_policy",
}


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def accuracy_plot(results: dict[str, dict[str, Any]], path: Path) -> Path:
    """Bars of held-out accuracy per model, annotated with the parameter count."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    names = list(results)
    accuracy = [100 * (results[n]["accuracy"] or 0.0) for n in names]
    figure, ax = plt.subplots(figsize=(7, 3.6))
    bars = ax.bar(names, accuracy, color=["#555555"] + ["#4C72B0"] * (len(names) - 1))
    for bar, name in zip(bars, names):
        ax.annotate(
            f"{accuracy[names.index(name)]:.1f}%\n{results[name]['parameters'] / 1e6:.2f}M",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_ylim(0, max(100.0, max(accuracy) * 1.25))
    ax.set_title("Task accuracy (greedy generation, answer extractor)")
    ax.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def verdict(results: dict[str, dict[str, Any]], on_policy_steps: int) -> str:
    """Sentences comparing the distilled and on-policy students with the teacher and the two fine-tuned baselines,
    from the measured figures only."""

    def accuracy(name: str) -> float:
        return results[name]["accuracy"] or 0.0

    distilled = accuracy("distilled")
    lines = []
    for name, what in (
        ("labels", "fine-tuning on gold labels only"),
        ("rationales", "fine-tuning on the teacher's rationales"),
    ):
        other = accuracy(name)
        if distilled > other:
            lines.append(f"Distillation beat {what} ({100 * distilled:.1f}% vs {100 * other:.1f}%).")
        elif distilled == other:
            lines.append(f"Distillation tied with {what} ({100 * distilled:.1f}%).")
        else:
            lines.append(f"Distillation did **not** beat {what} ({100 * distilled:.1f}% vs {100 * other:.1f}%).")
    lines.append(gap_sentence(results, on_policy_steps))
    return " ".join(lines)


def gap_sentence(results: dict[str, dict[str, Any]], steps: int) -> str:
    """What the on-policy continuation (``steps`` more optimizer steps than the rationale student had) did to the
    rationale student's gap to the teacher, in accuracy and KL."""
    teacher, before, after = (100 * (results[n]["accuracy"] or 0.0) for n in ("teacher", "rationales", "on_policy"))
    kl_before, kl_after = results["rationales"]["kl"], results["on_policy"]["kl"]
    kl = "" if kl_before is None or kl_after is None else f"; KL to the teacher {kl_before:.4f} -> {kl_after:.4f}"
    gap = teacher - before
    if gap <= 0:
        return (
            f"The teacher ({teacher:.1f}%) does **not** beat the rationale student ({before:.1f}%), so there is no "
            f"gap for on-policy distillation to close (on-policy student {after:.1f}%{kl})."
        )
    closed = after - before
    verb = f"closed {closed:.1f} points of it" if closed > 0 else f"did **not** close any of it ({closed:+.1f} points)"
    return (
        f"The teacher beats the rationale student by {gap:.1f} points ({teacher:.1f}% vs {before:.1f}%); the "
        f"on-policy student (the rationale student after {steps} more steps on its own samples) {verb}: "
        f"{after:.1f}%, {100 * closed / gap:.0f}% of the gap{kl}."
    )


def render_markdown(report: dict[str, Any]) -> str:
    results = report["results"]
    lines = [
        "# Quickstart report",
        "",
        (
            f"{results['teacher']['records']} held-out problems (multi-step arithmetic word problems, "
            "`distill.data.synthetic`), greedy generation of at most "
            f"{report['config']['max_new_tokens']} tokens, answers read by the `answer_is` extractor. KL and top-1 "
            "agreement are per completion token against the teacher; perplexity is on the gold completions."
        ),
        "",
        "| model | what it is | parameters | accuracy | perplexity | KL to teacher | top-1 agreement | tokens/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, _, what in MODELS:
        r = results[name]
        accuracy = None if r["accuracy"] is None else 100 * r["accuracy"]
        lines.append(
            f"| {name} | {what} | {r['parameters']:,} | {_fmt(accuracy, '.1f')}% | {_fmt(r['perplexity'], '.3f')} "
            f"| {_fmt(r['kl'], '.4f')} | {_fmt(r['top1_agreement'], '.3f')} | {_fmt(r['tokens_per_second'], ',.0f')} |"
        )
    cot = report["cot"]
    lines += [
        "",
        report["verdict"],
        "",
        (
            f"Teacher rationales (`data-gen cot`): {cot['rows']} kept for {cot['solved']} of {cot['questions']} "
            f"training questions; rejections: {cot['rejections'] or 'none'}."
        ),
        "",
        (
            f"Distillation loss terms: `{report['config']['loss_terms']}`"
            f"{' (LoRA)' if report['config']['lora']['enabled'] else ' (full fine-tuning)'}; on-policy: "
            f"`{report['config']['on_policy']['terms']}` on the student's samples at temperature "
            f"{report['config']['on_policy']['temperature']} for {report['config']['on_policy']['steps']} steps "
            f"(student_fraction {report['config']['on_policy']['student_fraction']})."
        ),
        "",
        "![accuracy](plots/accuracy.png)",
        "",
        "## Training curves",
        "",
    ]
    for folder in RUNS.values():
        lines += [f"### {folder}", "", f"![{folder}](plots/{folder}/train_terms.png)", ""]
    seconds = report["timings"]
    lines += ["## Time per stage (seconds, summed over resumed runs)", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {stage} | {value:.1f} |" for stage, value in seconds.items()]
    lines += [f"| total | {sum(seconds.values()):.1f} |", ""]
    return "\n".join(lines)


def write_report(
    root: Path, cfg: Any, results: dict[str, dict[str, Any]], cot_stats: dict[str, Any], timings: dict[str, float]
) -> dict[str, Any]:
    """Writes ``plots/``, ``report.md`` and, last (it marks the run finished), ``report.json``."""
    from distill.evaluation.plot import plot_run
    from kd_core.config import to_dict

    plots = root / "plots"
    plots.mkdir(exist_ok=True)
    accuracy_plot(results, plots / "accuracy.png")
    for run, folder in RUNS.items():
        plot_run(root / run, plots / folder, title=folder)
    summary = {name: {k: v for k, v in r.items() if k != "samples"} for name, r in results.items()}
    report = {
        "results": summary,
        "verdict": verdict(summary, cfg.on_policy.steps),
        "cot": cot_stats,
        "timings": timings,
        "config": to_dict(cfg),
    }
    markdown = render_markdown(report)
    atomic_write_text(root / "report.md", markdown)
    atomic_write_json(root / "report.json", report)  # last: its presence means the quickstart finished
    print(markdown)
    return report
