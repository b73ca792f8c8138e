"""Every logit path reproduces the model's own head (bias, scale, soft-cap) against ``model(...).logits``.

Tiny random models of each family whose transformers 5.24 head does more than ``hidden @ weight.T``: Gemma-2 and
Gemma-3 (final_logit_softcapping), Cohere (logit_scale), Granite and GraniteMoE (logits_scaling), Phi (an lm_head
with a bias); Llama as the plain head. Head weights are drawn large (std 0.5) so that each transformation moves the
logits by several nats: a path that skipped it would fail every comparison here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

from distill.data.datasets import IGNORE_INDEX
from distill.evaluation.metrics import token_metrics
from distill.losses.divergences import chunked_cross_entropy_sum, chunked_divergence, per_token_divergence
from distill.losses.head import OutputHead, output_head
from distill.losses.objective import LossSettings, StudentWithObjective, target_labels, target_positions
from distill.losses.topk import chunked_topk_divergence, topk_per_token
from distill.offline.precompute import teacher_topk
from distill.offline.store import TopKTargets
from distill.training.on_policy import sampled_logprob_sum
from distill.training.teacher import OnlineTeacher
from kd_core.config import ConfigError
from kd_core.generation import generate_tokens

V, H = 50, 32
COMMON = dict(
    vocab_size=V,
    hidden_size=H,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
FAMILIES = {
    "gemma2": lambda: transformers.Gemma2Config(**COMMON, head_dim=16, final_logit_softcapping=2.0),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(**COMMON, head_dim=16, final_logit_softcapping=2.0),
    "cohere": lambda: transformers.CohereConfig(**COMMON, logit_scale=4.0),
    "granite": lambda: transformers.GraniteConfig(**COMMON, logits_scaling=0.25),
    "granitemoe": lambda: transformers.GraniteMoeConfig(
        **COMMON, logits_scaling=0.25, num_local_experts=2, num_experts_per_tok=1
    ),
    "phi": lambda: transformers.PhiConfig(**COMMON),  # lm_head = nn.Linear(..., bias=True)
    "llama": lambda: transformers.LlamaConfig(**COMMON),
}


def build(family: str, seed: int) -> transformers.PreTrainedModel:
    config = FAMILIES[family]()
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.weight.normal_(0.0, 0.5)
        if head.bias is not None:
            head.bias.normal_(0.0, 1.0)
    return model


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (2, 9), generator=generator)
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX  # the prompt
    labels[1, -2:] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_same_grads(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        # fp32 sums in another order: tolerances relative to the largest entry (a head left out moves them by O(1))
        scale = want[name].abs().max().item()
        torch.testing.assert_close(
            got[name], want[name], rtol=1e-3, atol=1e-4 * scale + 1e-7, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_head_is_the_models_own(family):
    model = build(family, 0)
    head = output_head(model)
    assert head.plain == (family == "llama")
    b = batch()
    hidden = model.get_decoder()(input_ids=b["input_ids"]).last_hidden_state
    with torch.no_grad():
        want = model(input_ids=b["input_ids"]).logits
        torch.testing.assert_close(head.logits(hidden.reshape(-1, H)).reshape(want.shape), want)
        if not head.plain:  # the bare matmul is far off: the comparisons of this file can fail
            assert (hidden @ head.weight.t() - want).abs().max() > 0.5


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llama"])
@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_objective_loss_and_gradients(family, kind):
    """The training objective (student's chunked kernels, online teacher's targets) equals the divergence and
    cross-entropy of the two models' own logits, in value and in every student parameter's gradient."""
    student, teacher = build(family, 0).train(), build(family, 1)
    settings = LossSettings(terms={kind: 1.0, "ce": 0.5}, temperature=2.0, beta=0.3, chunk_size=4)
    b = batch()
    positions = target_positions(b["labels"])
    with torch.no_grad():
        teacher_logits = teacher(input_ids=b["input_ids"]).logits[positions]
    logits = student(input_ids=b["input_ids"]).logits[positions]
    want_kd = per_token_divergence(logits, teacher_logits, kind, temperature=2.0, beta=0.3).sum()
    want_ce = F.cross_entropy(logits, target_labels(b["labels"], positions), reduction="sum")
    (want_kd + 0.5 * want_ce).backward()
    want_grads = grads(student)

    objective = StudentWithObjective(student, settings, V)
    with OnlineTeacher(teacher, settings, zero3=False).targets(b) as targets:
        terms = objective(b["input_ids"], b["attention_mask"], b["labels"], teacher=targets)
    torch.testing.assert_close(terms[kind], want_kd.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(terms["ce"], want_ce.detach(), rtol=1e-5, atol=1e-5)
    (terms[kind] + 0.5 * terms["ce"]).backward()
    assert_same_grads(grads(student), want_grads)


@pytest.mark.parametrize("family", ["gemma2", "cohere", "phi"])
def test_kernels_under_bf16_autocast(family):
    """Under bf16 autocast (the products in bf16, as the model's own lm_head runs), the chunked kernels stay
    within bf16 rounding of the fp32 model logits."""
    student, teacher = build(family, 0), build(family, 1)
    b = batch()
    hidden = student.get_decoder()(input_ids=b["input_ids"]).last_hidden_state.reshape(-1, H).detach()
    t_hidden = teacher.get_decoder()(input_ids=b["input_ids"]).last_hidden_state.reshape(-1, H).detach()
    with torch.no_grad():
        want = per_token_divergence(
            student(input_ids=b["input_ids"]).logits.reshape(-1, V),
            teacher(input_ids=b["input_ids"]).logits.reshape(-1, V),
            "forward_kl",
        ).sum()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = chunked_divergence(
            hidden, output_head(student), t_hidden, output_head(teacher), "forward_kl", chunk_size=5
        )
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llama"])
def test_cross_entropy_kernel_every_chunking(family):
    student = build(family, 0).train()
    b = batch()
    positions = target_positions(b["labels"])
    targets = target_labels(b["labels"], positions)
    weights = torch.linspace(0.5, 1.5, targets.numel())
    logits = student(input_ids=b["input_ids"]).logits[positions]
    (F.cross_entropy(logits, targets, reduction="none") * weights).sum().backward()
    want = grads(student)
    for chunk_size in (1, 3, 64):
        hidden = student.get_decoder()(input_ids=b["input_ids"]).last_hidden_state[positions]
        chunked_cross_entropy_sum(hidden, output_head(student), targets, chunk_size, weights).backward()
        assert_same_grads(grads(student), want)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llama"])
def test_offline_store_targets_and_topk_kernel(family):
    """precompute's teacher top-k equals the top-k of the teacher's own log-probabilities, and the bucketed kernel
    of the student equals the bucketed divergence of the student's own logits (value and gradients)."""
    student, teacher = build(family, 0).train(), build(family, 1)
    b = batch()
    positions = target_positions(b["labels"])
    with torch.no_grad():
        t_logp = torch.log_softmax(teacher(input_ids=b["input_ids"]).logits[positions] / 2.0, -1)
        t_hidden = teacher.get_decoder()(input_ids=b["input_ids"]).last_hidden_state[positions]
        ids, values, tails = teacher_topk(t_hidden, output_head(teacher), 8, 2.0, 3, V)
    want_values, want_ids = t_logp.topk(8, dim=-1)
    torch.testing.assert_close(values, want_values)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(tails, torch.logsumexp(t_logp.scatter(1, want_ids, float("-inf")), -1))

    targets = TopKTargets(ids, values, tails)
    logits = student(input_ids=b["input_ids"]).logits[positions]
    want = topk_per_token(logits, targets, "reverse_kl", temperature=2.0).sum()
    want.backward()
    want_grads = grads(student)
    hidden = student.get_decoder()(input_ids=b["input_ids"]).last_hidden_state[positions]
    got = chunked_topk_divergence(hidden, output_head(student), targets, "reverse_kl", temperature=2.0, chunk_size=3)
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)
    got.backward()
    assert_same_grads(grads(student), want_grads)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llama"])
def test_eval_metrics(family):
    student, teacher = build(family, 0), build(family, 1)
    b = batch()
    positions = target_positions(b["labels"])
    with torch.no_grad():
        s_logits = student(input_ids=b["input_ids"]).logits[positions]
        t_logits = teacher(input_ids=b["input_ids"]).logits[positions]
    metrics = token_metrics(student, teacher, [b], V, chunk_size=4)
    tokens = int(positions.sum())
    assert metrics["tokens"] == tokens
    assert metrics["loss"] == pytest.approx(
        F.cross_entropy(s_logits, target_labels(b["labels"], positions)).item(), rel=1e-5
    )
    assert metrics["kl"] == pytest.approx(
        per_token_divergence(s_logits, t_logits, "forward_kl").mean().item(), rel=1e-4, abs=1e-6
    )
    agreement = (s_logits.argmax(-1) == t_logits.argmax(-1)).float().mean().item()
    assert metrics["top1_agreement"] == pytest.approx(agreement)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llama"])
def test_on_policy_log_probs(family):
    """The on-policy figures: the student's sampled-token log-probabilities and the teacher's log-likelihood of
    them (each through its chunked head) are the models' own."""
    student, teacher = build(family, 0), build(family, 1)
    prompt = batch()["input_ids"][0, :4].tolist()
    sample = generate_tokens(
        student, [prompt], pad_token_id=0, eos_token_ids=[], max_new_tokens=5, temperature=0.0, top_p=1.0, top_k=0
    )[0]
    sequence = torch.tensor([prompt + sample.tokens])
    with torch.no_grad():
        logp = torch.log_softmax(student(input_ids=sequence).logits[0, len(prompt) - 1 : -1], -1)
    want = logp.gather(1, torch.tensor(sample.tokens)[:, None]).sum().item()
    example = {
        "input_ids": prompt + sample.tokens,
        "labels": [IGNORE_INDEX] * len(prompt) + sample.tokens,
        "sample_id": 0,
    }
    assert sampled_logprob_sum(student, [example], pad_token_id=0) == pytest.approx(want, rel=1e-4, abs=1e-4)

    labels = sequence.clone()
    labels[:, : len(prompt)] = IGNORE_INDEX
    settings = LossSettings(terms={"forward_kl": 1.0})
    b = {"input_ids": sequence, "attention_mask": torch.ones_like(sequence), "labels": labels}
    positions = target_positions(labels)
    with OnlineTeacher(teacher, settings, zero3=False).targets(b) as targets:
        nll = targets.label_nll_sum(positions, target_labels(labels, positions), chunk_size=2)
    with torch.no_grad():
        want_nll = F.cross_entropy(
            teacher(input_ids=sequence).logits[positions], target_labels(labels, positions), reduction="sum"
        )
    assert nll == pytest.approx(want_nll.item(), rel=1e-5)


def test_plain_head_is_bit_identical_to_the_bare_weight():
    """A Llama head takes the pre-head code path: the same bits as passing the lm_head weight itself."""
    student, teacher = build("llama", 0), build("llama", 1)
    b = batch()
    hidden = student.get_decoder()(input_ids=b["input_ids"]).last_hidden_state.reshape(-1, H).detach()
    t_hidden = teacher.get_decoder()(input_ids=b["input_ids"]).last_hidden_state.reshape(-1, H).detach()
    s_w, t_w = student.get_output_embeddings().weight, teacher.get_output_embeddings().weight
    for temperature in (1.0, 2.0):
        by_head = chunked_divergence(
            hidden, output_head(student), t_hidden, output_head(teacher), "jsd", temperature=temperature, chunk_size=4
        )
        by_weight = chunked_divergence(hidden, s_w, t_hidden, t_w, "jsd", temperature=temperature, chunk_size=4)
        assert torch.equal(by_head, by_weight)


def test_unknown_head_transformation_is_refused():
    """A family outside the table whose config sets a head attribute is refused in one line naming it."""
    config = FAMILIES["llama"]()
    config.logit_scale = 2.0
    model = transformers.LlamaForCausalLM(config)
    with pytest.raises(ConfigError, match=r"^model_type 'llama': its config sets logit_scale") as error:
        output_head(model)
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        StudentWithObjective(model, LossSettings(terms={"ce": 1.0}), V)
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        OnlineTeacher(model, LossSettings(terms={"forward_kl": 1.0}), zero3=False)
    # Feature terms alone never read the head: nothing to refuse.
    config.logit_scale = 1.0
    assert output_head(transformers.LlamaForCausalLM(config)).plain


def test_head_dataclass_is_frozen():
    head = OutputHead(torch.zeros(3, 2), scale=2.0)
    with pytest.raises(AttributeError):
        head.scale = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("command", ["eval", "precompute", "train"])
def test_commands_refuse_an_unreproducible_head(command, model_dirs, train_file, tmp_path, capsys):
    """`distill eval`, `precompute` and `train` (as the teacher) on a model whose head cannot be reproduced: one
    line naming the model type, exit 2, nothing written."""
    import json
    import shutil

    from kd_core.commands import run_command
    from tests.conftest import tree_digest

    model = tmp_path / "scaled"
    shutil.copytree(model_dirs["teacher"], model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "logits_scale": 3.0}))
    data = tmp_path / "data.jsonl"
    shutil.copy(train_file, data)
    if command == "eval":
        from distill.evaluation.command import main

        argv = [str(model), "--data", str(data), "--output", str(tmp_path / "out" / "eval.json")]
    elif command == "precompute":
        from distill.offline.precompute import main

        argv = ["--teacher", str(model), "--output_dir", str(tmp_path / "store"), "--data.train_file", str(data)]
    else:
        from distill.training.train import main

        argv = [
            "--output_dir",
            str(tmp_path / "run"),
            "--max_steps",
            "1",
            "--report_to",
            "[none]",
            "--data.eval_fraction",
            "0",
            "--model.student",
            str(model_dirs["student"]),
            "--model.teacher",
            str(model),
            "--data.train_file",
            str(data),
            "--loss.terms",
            "{forward_kl: 1}",
        ]
    before = tree_digest(tmp_path)
    capsys.readouterr()
    assert run_command(main, argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]  # after progress bars
    assert len(errors) == 1 and errors[0].startswith("error: model_type 'llama': its config sets logits_scale")
    assert tree_digest(tmp_path) == before
