"""`loss.terms_at_end`: the terms' weights move linearly from loss.terms (first step) to terms_at_end (last step),
as a function of the step alone, so a resumed run weights every step as the uninterrupted one did."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file

from distill.losses.objective import LossSettings
from kd_core.config import ConfigError
from kd_core.ownership import MARKER
from tests.distill.training.test_resume import config as resume_config

START = {"forward_kl": 0.8, "ce": 0.2}
END = {"forward_kl": 0.2, "ce": 0.8}


def test_weights_move_linearly_from_the_first_step_to_the_last():
    scheduled = LossSettings(terms=START, terms_at_end=END)
    assert scheduled.weights_at(0, 5) == START
    assert scheduled.weights_at(2, 5) == pytest.approx({"forward_kl": 0.5, "ce": 0.5})
    assert scheduled.weights_at(4, 5) == pytest.approx(END)
    assert scheduled.weights_at(0, 1) == START  # a one-step run stays at loss.terms
    assert LossSettings(terms=START).weights_at(3, 5) == START  # no schedule: constant


@pytest.mark.parametrize(
    ("end", "message"),
    [
        ({"ce": 1.0}, r"terms_at_end: expected a weight for each of loss.terms \['ce', 'forward_kl'\], got \['ce'\]"),
        ({"forward_kl": 0.1, "ce": 1.0, "jsd": 1.0}, r"expected a weight for each of loss.terms"),
        ({"forward_kl": -0.1, "ce": 1.0}, r"terms_at_end: forward_kl: expected a number >= 0, got -0.1"),
        ({"forward_kl": float("nan"), "ce": 1.0}, r"terms_at_end: forward_kl: expected a number >= 0, got nan"),
    ],
)
def test_a_schedule_that_does_not_reweight_the_same_terms_is_refused(end, message):
    with pytest.raises(ValueError, match=message):
        LossSettings(terms=START, terms_at_end=end)


def test_a_term_cannot_start_at_zero():
    with pytest.raises(ValueError, match=r"terms_at_end: jsd has weight 0 in loss.terms, so it is never computed"):
        LossSettings(terms={**START, "jsd": 0.0}, terms_at_end={**END, "jsd": 0.5})


def config(model_dirs, train_file, out, **overrides):
    """test_resume's three-step run (a checkpoint after each step) with the schedule unless ``loss`` is given."""
    return resume_config(model_dirs, train_file, out, **{"loss": {"terms": START, "terms_at_end": END}, **overrides})


def logged(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"train/loss"' in line]


def test_training_weights_each_step_by_the_schedule_and_a_resumed_run_is_exact(model_dirs, train_file, tmp_path):
    from distill.training.train import run

    full = tmp_path / "full"
    run(config(model_dirs, train_file, full))
    steps = logged(full)
    assert [s["train/weight/ce"] for s in steps] == pytest.approx([0.2, 0.5, 0.8])
    assert [s["train/weight/forward_kl"] for s in steps] == pytest.approx([0.8, 0.5, 0.2])
    for s in steps:  # the optimised loss is the scheduled sum of the terms
        weighted = s["train/weight/forward_kl"] * s["train/forward_kl"] + s["train/weight/ce"] * s["train/ce"]
        assert s["train/loss"] == pytest.approx(weighted, rel=1e-5)

    stopped = tmp_path / "stopped"  # the run as it was when stopped after its first checkpoint
    stopped.mkdir()
    shutil.copytree(full / "checkpoint-1", stopped / "checkpoint-1")
    run(config(model_dirs, train_file, stopped, resume="auto"))
    reference = load_file(str(full / "final" / "model.safetensors"))
    resumed = load_file(str(stopped / "final" / "model.safetensors"))
    for name, tensor in reference.items():
        assert (resumed[name] - tensor).abs().max().item() <= 1e-6, name

    # The schedule belongs to the run it started: resuming without it is refused, in its directory or elsewhere.
    again = tmp_path / "again"  # the first run as it was when preempted after its first checkpoint
    again.mkdir()
    shutil.copytree(full / "checkpoint-1", again / "checkpoint-1")
    marker = json.loads((full / MARKER).read_text())
    (again / MARKER).write_text(json.dumps({**marker, "state": "running"}))
    with pytest.raises(ConfigError, match=r"holds a run with other settings \(loss.terms_at_end\)"):
        run(config(model_dirs, train_file, again, resume="auto", loss={"terms": START}))
    with pytest.raises(ConfigError, match=r"different loss.terms_at_end \(checkpoint \{.*\} vs now None\)"):
        run(
            config(
                model_dirs,
                train_file,
                tmp_path / "elsewhere",
                resume=str(again / "checkpoint-1"),
                loss={"terms": START},
            )
        )
