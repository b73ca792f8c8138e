"""`distill train` across tokenizers (loss.cross_tokenizer): a teacher with its own SentencePiece-style tokenizer and
a student with a digit-by-digit byte-level BPE, off-policy on dataset text."""

from __future__ import annotations

import pytest
import torch

from distill.training.train import Distiller, TrainConfig, run
from kd_core.config import ConfigError
from tests.conftest import nested_config, write_jsonl

CORPUS = [
    "What is 12 plus 7? The answer is 19.",
    "Tom has 345 apples and 1200 pears, so he has 1545 fruits.",
    "The quick brown fox jumps over the lazy dog.",
] * 20
ROWS = [{"prompt": f"What is {i} plus {i * 3}?", "completion": f"The answer is {i + i * 3}."} for i in range(16)]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Teacher and student directories with unlike tokenizers (and vocabulary sizes). The teacher's head is scaled
    up so its distributions are peaked, as a trained model's are (a random one's are near uniform: ULD between two
    near-uniform distributions has almost nothing to teach)."""
    from distill.student.tiny import tiny_llama, train_sentencepiece_style_tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("cross")
    dirs = {}
    for name, tokenizer, hidden, layers in (
        ("teacher", train_sentencepiece_style_tokenizer(CORPUS, vocab_size=420), 64, 2),
        ("student", train_tokenizer(CORPUS, vocab_size=300, individual_digits=True), 32, 1),
    ):
        model = tiny_llama(len(tokenizer), hidden_size=hidden, num_layers=layers, seed=layers)
        if name == "teacher":
            model.lm_head.weight.data *= 30.0
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        dirs[name] = root / name
    dirs["data"] = write_jsonl(root / "train.jsonl", ROWS)
    return dirs


def _config(pair, out, mode, **overrides) -> TrainConfig:
    tree = {
        "output_dir": str(out),
        "max_steps": 12,
        "per_device_train_batch_size": 16,
        "learning_rate": 1e-2,
        "lr_scheduler_type": "constant",
        "save_steps": 100,
        "eval_steps": None,
        "logging_steps": 1,
        "report_to": ["none"],
        "model": {"teacher": str(pair["teacher"]), "student": str(pair["student"])},
        "data": {"train_file": str(pair["data"]), "eval_fraction": 0.0},
        "loss": {"terms": {"forward_kl": 1.0}, "chunk_size": 7, "cross_tokenizer": mode},
    }
    return nested_config(TrainConfig, tree, **overrides)


@pytest.mark.parametrize("mode", ["uld", "gold"])
def test_a_few_steps_lower_the_cross_tokenizer_divergence(pair, tmp_path, mode):
    """Every step sees the whole (16-row) dataset, so the logged values are one curve on the same text."""
    result = run(_config(pair, tmp_path / mode, mode))
    history = [h["train/forward_kl"] for h in result.summary["history"]]
    assert len(history) == 12 and all(v > 0 for v in history)
    assert history[-1] < 0.8 * history[0], history
    assert (tmp_path / mode / "final" / "model.safetensors").is_file()
    assert result.summary["final_eval"] == {} or "eval/kl" not in result.summary["final_eval"]


def test_the_teacher_reads_its_own_tokens_and_the_step_matches_the_kernel(pair, tmp_path):
    """One micro-batch by hand: the teacher's ids are its tokenizer's, every aligned pair is used, and the
    objective's value is the kernel's on those pairs."""
    from transformers import AutoTokenizer

    from distill.losses.cross import chunked_cross_divergence
    from distill.losses.head import output_head
    from distill.runtime import inner

    distiller = Distiller(
        _config(
            pair, tmp_path / "one", "gold", per_device_train_batch_size=4, **{"loss.terms": {"jsd": 1.0, "ce": 0.5}}
        )
    )
    batches, _, _ = distiller.next_micro_batches()
    batch = batches[0]
    teacher_tok = AutoTokenizer.from_pretrained(pair["teacher"])
    first = batch["teacher_input_ids"][0][batch["teacher_attention_mask"][0] == 1].tolist()
    own = batch["input_ids"][0][batch["attention_mask"][0] == 1].tolist()
    # The teacher reads the same rendered chat text in its own tokens, after its own BOS (the student's has none).
    assert first[0] == teacher_tok.bos_token_id and own[0] != distiller.tokenizer.bos_token_id
    assert teacher_tok.decode(first[1:]) == distiller.tokenizer.decode(own)
    assert first != own and max(first) < len(teacher_tok)
    assert len(batch["cross_pairs"]) > 4 * 3
    assert distiller.teacher.model is None  # no token-by-token held-out figures across tokenizers
    student = inner(distiller.module).student
    with distiller.teacher_targets(batch) as targets:
        terms = distiller.module(
            batch["input_ids"],
            batch["attention_mask"],
            batch["labels"],
            teacher=targets,
            loss_weights=batch["loss_weights"],
        )
        rows, s_pos, t_pos = batch["cross_pairs"].unbind(1)
        with torch.no_grad():
            hidden = student.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            expected = chunked_cross_divergence(
                hidden.last_hidden_state[rows, s_pos],
                output_head(student),
                targets.outputs.last_hidden_state[rows, t_pos],
                targets.head,
                distiller.cfg.loss.spec("jsd"),
                targets.match,
            )
    torch.testing.assert_close(terms["jsd"].detach(), expected, rtol=1e-5, atol=1e-6)
    assert set(terms) == {"jsd", "ce"}


def test_the_teacher_tokenizer_may_live_elsewhere(pair, tmp_path):
    import shutil

    weights_only = tmp_path / "teacher_weights"
    shutil.copytree(pair["teacher"], weights_only, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    cfg = _config(
        pair,
        tmp_path / "elsewhere",
        "uld",
        max_steps=1,
        **{"model.teacher": str(weights_only), "model.teacher_tokenizer": str(pair["teacher"])},
    )
    assert run(cfg).steps == 1
    with pytest.raises(ConfigError, match=r"model\.teacher_tokenizer: expected a tokenizer directory"):
        Distiller(_config(pair, tmp_path / "missing", "uld", **{"model.teacher_tokenizer": str(tmp_path / "no")}))


def test_without_cross_tokenizer_a_mismatch_is_still_refused(pair, tmp_path):
    with pytest.raises(ConfigError, match=r"tokenizer mismatch: .*or loss\.cross_tokenizer \(uld or gold\)"):
        Distiller(_config(pair, tmp_path / "refused", None))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"loss.terms": {"forward_kl": 0.5, "jsd": 0.5}}, r"cross_tokenizer: expected exactly one logit divergence"),
        ({"loss.terms": {"forward_kl": 1.0, "hidden_mse": 1.0}}, r"cross_tokenizer: feature terms"),
        ({"data.packing": True}, r"data\.packing: not supported with loss\.cross_tokenizer"),
        ({"on_policy.teacher_fraction": 0.5}, r"on_policy\.teacher_fraction: the teacher samples in its own"),
        ({"loss.cross_tokenizer": None, "model.teacher_tokenizer": "x"}, r"model\.teacher_tokenizer: only used with"),
    ],
)
def test_what_is_not_supported_yet_is_refused_up_front(pair, tmp_path, overrides, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        _config(pair, tmp_path / "x", "uld", **overrides)
