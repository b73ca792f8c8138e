"""bench/recovery.py's parts on a tiny run: the worker's periodic evaluations against the original teacher (the
recovery curves' points, with the training tokens seen), the curves PNG of several runs, and the general set."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from distill.evaluation.plot import plot_curves, read_metrics, wide_range
from tests.conftest import REPO_ROOT, addition_rows, write_jsonl

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
sys.path.insert(0, str(REPO_ROOT / "bench"))


def run_worker(model_dirs, root, name: str, terms: str, teacher: str) -> dict:
    """One bench worker process: 6 steps, an evaluation every 2, against the teacher of ``model_dirs``."""
    spec = root / f"{name}.spec.json"
    sets = {"gsm8k": str(write_jsonl(root / "eval.jsonl", addition_rows(5)))}
    sets["general"] = str(write_jsonl(root / "general.jsonl", addition_rows(9)[4:]))
    spec.write_text(json.dumps({"teacher": str(model_dirs["teacher"]), "sets": sets, "max_length": 64}))
    result = root / f"{name}.cost.json"
    argv = ["--model.student", str(model_dirs["student"]), "--model.teacher", teacher, "--max_steps", "6"]
    argv += ["--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--logging_steps", "1"]
    argv += ["--eval_steps", "2", "--save_steps", "100", "--report_to", "[none]", "--loss.terms", terms]
    argv += ["--data.train_file", str(write_jsonl(root / "train.jsonl", addition_rows(24))), "--data.eval_fraction"]
    argv += ["0", "--output_dir", str(root / name)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO_ROOT / "bench" / "recovery.py"), "--worker", str(result), str(spec), *argv]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(result.read_text())


def test_worker_evaluates_against_the_original_teacher_and_curves_draw_every_run(model_dirs, tmp_path):
    # A CE run keeps no teacher for training, yet its curves still measure KL to the original teacher.
    cost = run_worker(model_dirs, tmp_path, "ce", "{ce: 1.0}", str(model_dirs["teacher"]))
    run_worker(model_dirs, tmp_path, "kd", "{forward_kl: 1.0, ce: 0.1}", str(model_dirs["teacher"]))
    assert cost["seconds_per_step"] > 0 and cost["peak_rss_gib"] > 0
    series = read_metrics(tmp_path / "ce" / "metrics.jsonl")
    for key in ("eval/gsm8k_kl", "eval/gsm8k_perplexity", "eval/general_kl", "eval/general_alpha"):
        assert [step for step, _ in series[key]] == [2, 4, 6], key  # every eval_steps and at the end
    seen = [tokens for _, tokens in series["tokens_seen"]]
    assert seen[0] > 0 and seen == sorted(seen) and len(set(seen)) == 3
    kd = read_metrics(tmp_path / "kd" / "metrics.jsonl")
    # Distilling moves the student towards the teacher faster than CE at the same steps on this tiny pair.
    assert kd["eval/gsm8k_kl"][-1][1] < series["eval/gsm8k_kl"][0][1]
    png = plot_curves(
        {"CE": tmp_path / "ce", "KD": tmp_path / "kd"},
        [("eval/gsm8k_kl", "KL"), ("eval/gsm8k_perplexity", "perplexity"), ("eval/general_kl", "general KL")],
        tmp_path / "curves.png",
        "tiny recovery",
        start={"eval/gsm8k_kl": 9.0},
    )
    assert png.read_bytes().startswith(PNG_MAGIC) and png.stat().st_size > 10_000


def test_a_panel_spanning_more_than_tenfold_is_drawn_on_a_log_scale():
    assert wide_range([189.4, 5.0, 3.1])  # the untrained start against trained students' perplexities
    assert not wide_range([3.9, 1.4, 1.2]) and not wide_range([]) and not wide_range([0.0, 5.0])


def test_general_set_holds_the_teachers_own_answers(model_dirs, tmp_path):
    from recovery_parts import INSTRUCTIONS, general_set, instruction_prompt

    rows = [
        {"instruction": "Say hello.", "instances": [{"input": "", "output": "x"}]},
        {"instruction": "Add the numbers.", "instances": [{"input": "2 and 3", "output": "5"}]},
    ]
    write_jsonl(tmp_path / INSTRUCTIONS, rows)
    out = general_set(model_dirs["teacher"], tmp_path, tmp_path / "general.jsonl", 2, 8)
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["prompt"] for a in answers] == ["Say hello.", "Add the numbers.\n\n2 and 3"][: len(answers)]
    assert answers and all(a["completion"] for a in answers)
    assert instruction_prompt(rows[1]) == "Add the numbers.\n\n2 and 3"
    before = out.read_text()
    assert general_set(model_dirs["teacher"], tmp_path, out, 2, 8) == out and out.read_text() == before  # made once


def test_general_training_rows_are_human_written_and_skip_the_held_out_set(tmp_path):
    from recovery_parts import INSTRUCTIONS, SEED_TASKS, general_train_rows

    def task(name: str, output: str) -> dict:
        return {"instruction": name, "instances": [{"input": "", "output": output}]}

    write_jsonl(tmp_path / SEED_TASKS, [task("seed a", "A"), task("seed b", "")])  # no output: unusable
    write_jsonl(tmp_path / INSTRUCTIONS, [task("held out 1", "x"), task("held out 2", "y"), task("user c", "C")])
    rows = general_train_rows(tmp_path, 2, held_out=2)
    assert rows == [{"prompt": "seed a", "completion": "A"}, {"prompt": "user c", "completion": "C"}]
    with pytest.raises(SystemExit, match="--general_train: 3 rows asked, 2 general rows with an output exist"):
        general_train_rows(tmp_path, 3, held_out=2)


def test_teacher_text_rows_carry_the_teachers_greedy_answers(model_dirs, tmp_path):
    from recovery_parts import teacher_answers, with_teacher_text

    rows = [{"prompt": "1+2=", "completion": "human one", "ce_weight": 0.0}, {"prompt": "3+4=", "completion": "two"}]
    answers = teacher_answers(model_dirs["teacher"], [r["prompt"] for r in rows], 6)
    rewritten = with_teacher_text(rows, model_dirs["teacher"], 6)
    # Each completion is the teacher's own answer (the human one only where the teacher said nothing); other
    # fields stay, so the row's CE weight still reaches data.ce_weight_field.
    assert [r["completion"] for r in rewritten] == [a or r["completion"] for a, r in zip(answers, rows)]
    assert any(answers) and rewritten[0]["ce_weight"] == 0.0 and [r["prompt"] for r in rewritten] == ["1+2=", "3+4="]


def test_curves_draw_every_finished_run_of_the_seed_whichever_invocation_trained_it(tmp_path):
    import recovery

    runs = tmp_path / "runs"
    for name, finished in [
        ("sched_seqkd_corrected_300_seed42_general300", True),  # this invocation
        ("ce_300_seed42_general300", True),  # an earlier one
        ("seqkd_taskce05_corrected_300_seed42_general300", False),  # killed: no cost file
        ("ce_300_seed1_general300", True),  # another seed
        ("ce_300_seed42", True),  # another tag
    ]:
        (runs / name).mkdir(parents=True)
        if finished:
            (runs / f"{name}.cost.json").write_text("{}")
    found = recovery.finished_runs(tmp_path, 300, 42, "_general300")
    assert list(found) == ["ce", "sched_seqkd_corrected"]  # in VARIANTS order
    assert found["ce"] == runs / "ce_300_seed42_general300"
