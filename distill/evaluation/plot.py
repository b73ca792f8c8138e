"""``distill plot RUN_DIR``: draw the curves a training run logged in ``metrics.jsonl`` as PNG files.

``distill train`` appends one JSON line per logging step (``train/<term>``, ``train/loss``, ``train/lr``) and per
evaluation (``eval/<metric>``), each with its ``step``. This command draws:

* ``train_terms.png``: one panel per loss term (and the total ``loss``) against the step;
* ``eval.png``: one panel per eval metric (KL to the teacher, top-1 agreement, loss, ...), when any was logged;
* ``lr.png``: the learning-rate schedule.

matplotlib runs on the Agg backend (no display needed, safe in tests and on servers).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from kd_core.commands import EXIT_OK
from kd_core.config import ConfigError, option, parse_command_line

METRICS_FILE = "metrics.jsonl"


@dataclasses.dataclass
class PlotConfig:
    run_dir: str = option("", help="A run directory of `distill train` (holds metrics.jsonl).", positional=True)
    output_dir: str | None = option(None, help="Where the PNGs go; default: the run directory.")

    def __post_init__(self) -> None:
        if not self.run_dir:
            raise ValueError("run_dir: expected a run directory (distill plot RUN_DIR)")


def read_metrics(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{key: [(step, value), ...]}`` from a metrics.jsonl file; a torn last line (a killed run) is skipped."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"run_dir: {path} not found (is this a `distill train` output directory?)")
    series: dict[str, list[tuple[int, float]]] = {}
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # a run killed mid-write leaves a partial last line
                continue
            raise ConfigError(f"run_dir: {path}:{number} is not valid JSON") from None
        step = record.get("step")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(key, []).append((int(step), float(value)))
    if not series:
        raise ConfigError(f"run_dir: {path} holds no logged values")
    # A resumed run re-logs steps after its checkpoint: keep the last value logged for each step.
    return {key: sorted(dict(points).items()) for key, points in series.items()}


def _panels(series: dict[str, list[tuple[int, float]]], keys: list[str], title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    columns = min(3, len(keys))
    rows = math.ceil(len(keys) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        steps, values = zip(*series[key])
        ax.plot(steps, values, marker="o" if len(steps) < 12 else None, markersize=3)
        ax.set_title(key.split("/", 1)[-1])
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.set_visible(False)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_run(run_dir: str | Path, output_dir: str | Path | None = None, title: str | None = None) -> list[Path]:
    """Draws a run's logged curves; returns the PNG paths written."""
    run_dir = Path(run_dir)
    series = read_metrics(run_dir / METRICS_FILE)
    out = Path(output_dir) if output_dir is not None else run_dir
    out.mkdir(parents=True, exist_ok=True)
    name = title or run_dir.name
    written = []
    terms = sorted(k for k in series if k.startswith("train/") and k != "train/lr")
    if terms:
        # the total first, then the terms it is made of
        terms.sort(key=lambda k: (k != "train/loss", k))
        written.append(_panels(series, terms, f"{name}: training loss terms", out / "train_terms.png"))
    evals = sorted(k for k in series if k.startswith("eval/") and k != "eval/tokens")
    if evals:
        written.append(_panels(series, evals, f"{name}: held-out metrics", out / "eval.png"))
    if "train/lr" in series:
        written.append(_panels(series, ["train/lr"], f"{name}: learning rate", out / "lr.png"))
    return written


def plot_curves(
    runs: dict[str, str | Path],
    curves: list[tuple[str, str]],
    path: str | Path,
    title: str,
    *,
    x_key: str = "tokens_seen",
    start: dict[str, float] | None = None,
) -> Path:
    """Several runs in one PNG: one panel per ``(metrics.jsonl key, panel title)`` of ``curves``, one line per run
    (``runs``: label -> run directory), against ``x_key`` logged with the same evaluations (e.g. the training tokens
    seen; runs that did not log it are drawn against the step). ``start``: values every run starts from (the common
    checkpoint's figures), drawn at x = 0. A run missing a key is left out of that panel."""
    series = {label: read_metrics(Path(run) / METRICS_FILE) for label, run in runs.items()}
    panels = []
    for key, panel in curves:
        lines = {}
        for label, found in series.items():
            if key not in found:
                continue
            x_at = dict(found.get(x_key, []))
            lines[label] = [(x_at.get(step, step), value) for step, value in found[key]]
            if start is not None and key in start:
                lines[label].insert(0, (0, start[key]))
        panels.append((panel, lines))
    return draw_lines(panels, path, title, x_key.replace("_", " "))


def draw_lines(
    panels: list[tuple[str, dict[str, list[tuple[float, float]]]]], path: str | Path, title: str, x_label: str
) -> Path:
    """One PNG, one panel per ``(panel title, {label: [(x, y), ...]})``, one line per label; a panel whose values
    span more than a factor of 10 is drawn on a log scale. The one drawing routine of every comparison plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(label for _, lines in panels for label in lines))
    figure, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    for ax, (panel, lines) in zip(axes.flat, panels):
        for label, points in lines.items():
            if points:  # one colour per label in every panel, whichever labels a panel lacks
                ax.plot(*zip(*points), marker="o", markersize=3, label=label, color=f"C{labels.index(label) % 10}")
        if wide_range([y for points in lines.values() for _, y in points]):
            ax.set_yscale("log")  # an untrained start (perplexity 189) would flatten every trained point
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel(x_label)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return Path(path)


def wide_range(values: list[float]) -> bool:
    """Whether a panel's values are all positive and span more than a factor of 10: drawn on a log scale."""
    return bool(values) and min(values) > 0 and max(values) > 10 * min(values)


Config = PlotConfig


def run(cfg: PlotConfig) -> list[Path]:
    """Draws the run's curves into ``cfg.output_dir`` (default: the run directory); returns the PNG paths."""
    written = plot_run(cfg.run_dir, cfg.output_dir)
    for path in written:
        print(f"wrote {path}")
    return written


def main(argv: list[str]) -> int:
    cfg = parse_command_line(PlotConfig, argv, "distill plot", __doc__ or "")
    run(cfg)
    return EXIT_OK
