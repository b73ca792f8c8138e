"""``distill plot``: PNGs from a real (tiny) training run's metrics.jsonl, a resumed run's duplicate steps, bad
input."""

from __future__ import annotations

import json

import pytest

from distill.evaluation import plot
from distill.evaluation.plot import read_metrics
from kd_recipes.cli import distill_main as cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(model_dirs, tmp_path_factory):
    """Four steps of `distill train` with two logit terms and evaluation: a real run directory."""
    from distill.training import train
    from kd_core.config import from_dict

    root = tmp_path_factory.mktemp("plot")
    data = root / "train.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"What is {i} plus 2?", "completion": f"It is {i + 2}."}) + "\n" for i in range(24)
        )
    )
    cfg = from_dict(
        train.Config,
        {
            "output_dir": str(root / "run"),
            "max_steps": 4,
            "per_device_train_batch_size": 4,
            "learning_rate": 1e-3,
            "logging_steps": 1,
            "eval_steps": 2,
            "save_steps": 100,
            "report_to": ["none"],
            "model": {"teacher": str(model_dirs["teacher"]), "student": str(model_dirs["student"])},
            "data": {"train_file": str(data), "eval_fraction": 0.25},
            "loss": {"terms": {"forward_kl": 0.5, "ce": 0.5}},
        },
    )
    train.run(cfg)
    return root / "run"


def test_plot_command_draws_every_logged_curve(run_dir, tmp_path, capsys):
    import matplotlib.image

    out = tmp_path / "pngs"
    assert cli(["plot", str(run_dir), "--output-dir", str(out)]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == ["eval.png", "lr.png", "train_terms.png"]
    for name in written:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
        height, width, _ = matplotlib.image.imread(out / name).shape
        assert height > 200 and width > 300
    assert "wrote" in capsys.readouterr().out
    series = read_metrics(run_dir / "metrics.jsonl")
    assert {"train/loss", "train/forward_kl", "train/ce", "train/lr", "eval/kl", "eval/loss"} <= set(series)
    assert [step for step, _ in series["train/ce"]] == [1, 2, 3, 4]


def test_default_output_is_the_run_dir(run_dir):
    paths = plot.run(plot.Config(run_dir=str(run_dir)))
    assert {p.parent for p in paths} == {run_dir}
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in paths)


def test_resumed_and_torn_logs(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [
        {"step": 1, "train/ce": 3.0},
        {"step": 2, "train/ce": 2.0},
        {"step": 2, "train/ce": 1.5},  # resumed
        {"step": 3, "train/ce": 1.0},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "train/c')
    assert read_metrics(run / "metrics.jsonl")["train/ce"] == [(1, 3.0), (2, 1.5), (3, 1.0)]
    assert [p.name for p in plot.run(plot.Config(run_dir=str(run)))] == ["train_terms.png"]


def test_bad_input_exits_2(tmp_path, capsys):
    assert cli(["plot", str(tmp_path)]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    assert cli(["plot", str(tmp_path)]) == 2
    assert "metrics.jsonl:2 is not valid JSON" in capsys.readouterr().err
    assert cli(["plot"]) == 2


def test_comparison_lines_keep_their_colour_in_every_panel(tmp_path, monkeypatch):
    """A run missing from one panel (the on-policy run logs no perplexity here) must not shift the others' colours."""
    from matplotlib.axes import Axes

    drawn, original = [], Axes.plot

    def spy(self, *args, **kwargs):
        drawn.append((kwargs["label"], kwargs["color"]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", spy)
    panels = [
        ("perplexity", {"on_policy": [], "gold": [(0, 189.0), (10, 4.0)], "kd": [(0, 189.0), (10, 3.5)]}),
        ("KL", {"on_policy": [(10, 0.9)], "gold": [(0, 3.9), (10, 1.4)], "kd": [(0, 3.9), (10, 1.0)]}),
    ]
    png = plot.draw_lines(panels, tmp_path / "lines.png", "comparison", "tokens seen")
    assert png.read_bytes().startswith(PNG_MAGIC)
    colours = {}
    for label, colour in drawn:
        assert colours.setdefault(label, colour) == colour, (label, drawn)
    assert len(set(colours.values())) == 3 and len(drawn) == 5  # an empty line is not drawn
