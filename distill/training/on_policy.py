"""On-policy distillation: the student (or the teacher) writes the completions a micro-batch is trained on.

GKD (Agarwal et al., 2024) trains the student on a mix of fixed completions and its own samples, scored token by
token by the teacher; sequence-level KD (Kim & Rush, 2016) trains it on the teacher's samples. ``on_policy`` says
which fraction of micro-batches is which: each micro-batch is drawn, with one generator that every rank draws
identically (ZeRO-3 generation is collective, so ranks must agree), as student-sampled with probability
``student_fraction``, teacher-sampled with ``teacher_fraction``, and otherwise taken as the dataset has it.

A sampled micro-batch keeps each example's prompt (``prompt_length`` tokens: the chat template's generation prompt
included, :mod:`distill.data.datasets`) and replaces the completion by the sampled tokens, cut after the first stop
token; everything after it is padding, which the labels never count. The loss is then the configured objective on
those tokens: every logit divergence and feature term as on fixed data, with ``ce`` switched off on student samples
(cross-entropy on one's own samples teaches nothing; on teacher samples it is sequence-level KD).

Sampling runs :func:`kd_core.generation.generate_tokens` (KV cache, left padding) on the unwrapped model, under the
training's autocast (bf16 mixed precision samples in bf16, as the student trains): under ZeRO-3 trl's
``unwrap_model_for_generation`` gathers the student's full weights on every rank for the duration of the sampling
(memory of one whole student per rank, as trl's GKDTrainer does). Samples come from the model's own distribution at
``temperature`` / ``top_p`` / ``top_k``: whatever its generation config switches on (a repetition penalty, ``min_p``,
...) is neutral unless ``generation_kwargs`` names it. The logged mean log-probability of the student's sampled tokens
comes from one extra forward pass over the samples and the chunked head
(:func:`distill.losses.logprobs.chunked_token_logprobs`), never from ``[batch, new tokens, vocabulary]`` logits.

Sampling's randomness comes from this module's own per-rank generator state, restored around each call, so nothing
else (dropout, evaluation) shifts it, and it is saved in every checkpoint with the draw generator and the replay
buffer: a resumed run samples what the uninterrupted one would have.

``replay_ratio`` reuses earlier student samples (DistiLLM's off-policy replay, Ko et al., 2024): a student-sampled
micro-batch is, with that probability and once the buffer holds a batch, drawn from a buffer of the
``replay_buffer_size`` most recent student samples instead of being generated. It saves generation time at the cost
of samples from a slightly older student. (DistiLLM also adapts the ratio during training; here it is fixed.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from distill.data.cross import PROMPT_IDS
from distill.data.datasets import IGNORE_INDEX, collate
from distill.losses.head import output_head
from distill.losses.logprobs import chunked_token_logprobs
from kd_core.config import ConfigError, option
from kd_core.generation import check_generation_kwargs, generate_tokens, stop_token_ids

if TYPE_CHECKING:
    from accelerate import Accelerator

OFF_POLICY, STUDENT, TEACHER, REPLAY = "off_policy", "student", "teacher", "replay"
STATE_FILE = "on_policy_rank_{rank}.pt"  # one per rank in every checkpoint (distill.training.checkpoint hashes it)


@dataclasses.dataclass
class OnPolicySettings:
    student_fraction: float = option(
        0.0,
        help="Fraction of micro-batches whose completions the student samples (GKD's lambda); 0 = off-policy "
        "training on the dataset's completions.",
    )
    teacher_fraction: float = option(
        0.0, help="Fraction of micro-batches whose completions the teacher samples (sequence-level KD)."
    )
    max_new_tokens: int = option(128, help="Longest sampled completion, in tokens.")
    temperature: float = option(1.0, help="Sampling temperature; 0 = greedy.")
    top_p: float = option(1.0, help="Nucleus sampling: keep the smallest set of tokens with this probability mass.")
    top_k: int = option(0, help="Sample from the k most likely tokens only; 0 = no top-k cut.")
    generation_kwargs: dict[str, Any] = option(
        {},
        help="transformers GenerationConfig settings to switch on while sampling, e.g. {repetition_penalty: 1.1}; "
        "every other knob the model's generation_config.json sets is neutral, so samples follow the policy.",
    )
    replay_ratio: float = option(
        0.0,
        help="DistiLLM's off-policy replay: probability that a student-sampled micro-batch reuses earlier student "
        "samples from the replay buffer instead of generating; 0 = always generate.",
    )
    replay_buffer_size: int = option(256, help="Student samples the replay buffer keeps (the newest ones).")

    def __post_init__(self) -> None:
        for name in ("student_fraction", "teacher_fraction", "replay_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: expected a number in [0, 1], got {getattr(self, name)}")
        if self.student_fraction + self.teacher_fraction > 1.0 + 1e-9:
            raise ValueError(
                f"student_fraction + teacher_fraction: expected at most 1, got "
                f"{self.student_fraction} + {self.teacher_fraction}"
            )
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature: expected >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p: expected a number in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k: expected >= 0 (0 = off), got {self.top_k}")
        if self.replay_buffer_size < 1:
            raise ValueError(f"replay_buffer_size: expected >= 1, got {self.replay_buffer_size}")
        if self.replay_ratio > 0 and self.student_fraction == 0:
            raise ValueError(
                f"replay_ratio: {self.replay_ratio} replays student samples, and student_fraction is 0: "
                "nothing would ever be replayed; set student_fraction or leave replay_ratio at 0"
            )
        check_generation_kwargs(self.generation_kwargs, "generation_kwargs")

    def check_replay_buffer(self, batch_size: int) -> None:
        """A micro-batch is replayed only once the buffer holds a whole one (:meth:`Sampler.draw`): a smaller buffer
        would never replay, without a word."""
        if self.replay_ratio > 0 and self.replay_buffer_size < batch_size:
            raise ValueError(
                f"on_policy.replay_buffer_size: {self.replay_buffer_size} samples never hold one "
                f"micro-batch (per_device_train_batch_size {batch_size}), so replay_ratio "
                f"{self.replay_ratio} would never replay; expected a buffer of at least {batch_size}"
            )

    @property
    def enabled(self) -> bool:
        return self.student_fraction > 0 or self.teacher_fraction > 0

    @property
    def always_sampled(self) -> bool:
        """Whether every micro-batch is sampled (then a dataset of prompts only is enough)."""
        return self.student_fraction + self.teacher_fraction >= 1.0 - 1e-9


def check_dataset(settings: OnPolicySettings, examples, source: str) -> None:
    """Prompts are needed to sample from (not ``text`` rows), and completions for off-policy micro-batches."""
    first = examples[0]
    if settings.enabled and first["prompt_length"] is None:
        raise ConfigError(
            f"data.train_file: {source} holds `text` rows; on-policy sampling needs prompts (`prompt`, "
            "`prompt`/`completion` or `messages` columns)"
        )
    if not settings.always_sampled:
        missing = examples.first_without_completion()  # a column scan: a Python loop over rows costs minutes at 10M
        if missing is not None:
            raise ConfigError(
                f"data.train_file: {source} row {missing} is a prompt without a completion; "
                f"prompts-only data needs every micro-batch sampled (on_policy.student_fraction + "
                f"teacher_fraction = 1, now {settings.student_fraction} + {settings.teacher_fraction})"
            )


def _device_states(device: torch.device) -> list[int]:
    return [device.index or 0] if device.type == "cuda" else []


class Sampler:
    """Decides, samples and replays the completions of micro-batches on one rank; its state is checkpointed."""

    def __init__(self, settings: OnPolicySettings, seed: int, rank: int, device: torch.device) -> None:
        self.settings = settings
        self.rank = rank
        self.device = device
        self.draws = torch.Generator().manual_seed(seed)  # identical on every rank: the ranks agree on each draw
        self.sampler_seed = seed * 1000 + 17 + rank  # this rank's samples differ from the others'
        self.sampler_state: dict[str, Any] | None = None  # torch's RNG state between samplings (None: not yet used)
        self.buffer: list[dict[str, Any]] = []  # the newest student samples, as training examples
        self.counts = {STUDENT: 0, TEACHER: 0, REPLAY: 0, OFF_POLICY: 0, "generated_tokens": 0}

    # -- decisions ---------------------------------------------------------------------------------------------

    def draw(self, batch_size: int) -> str:
        """Where the next micro-batch's completions come from (the same answer on every rank)."""
        s = self.settings
        u = torch.rand((), generator=self.draws).item()
        if u < s.student_fraction:
            replay = torch.rand((), generator=self.draws).item() < s.replay_ratio
            return REPLAY if replay and len(self.buffer) >= batch_size else STUDENT
        if u < s.student_fraction + s.teacher_fraction:
            return TEACHER
        self.counts[OFF_POLICY] += 1
        return OFF_POLICY

    def upcoming(self, count: int) -> list[str | None]:
        """What :meth:`draw` will answer for the next ``count`` micro-batches, as far as it is certain now (the draws
        generator is copied, not moved): ``OFF_POLICY`` where the dataset's completions will be used, None where the
        micro-batch is sampled; after a draw that may replay (a replay draws its indices from the same generator,
        as many as the buffer then holds) nothing more is certain."""
        s, draws = self.settings, torch.Generator()
        draws.set_state(self.draws.get_state())
        sources: list[str | None] = []
        while len(sources) < count:
            u = torch.rand((), generator=draws).item()
            if u >= s.student_fraction + s.teacher_fraction:
                sources.append(OFF_POLICY)
                continue
            sources.append(None)
            if u < s.student_fraction and torch.rand((), generator=draws).item() < s.replay_ratio:
                break
        return sources + [None] * (count - len(sources))

    # -- sampling ----------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def own_rng(self) -> Iterator[None]:
        """torch's global generator set to this sampler's state for the block, and restored afterwards."""
        devices = _device_states(self.device)
        with torch.random.fork_rng(devices=devices):
            if self.sampler_state is None:
                torch.manual_seed(self.sampler_seed)
            else:
                torch.set_rng_state(self.sampler_state["cpu"])
                for index, state in zip(devices, self.sampler_state["cuda"]):
                    torch.cuda.set_rng_state(state, index)
            yield
            self.sampler_state = {"cpu": torch.get_rng_state(), "cuda": [torch.cuda.get_rng_state(i) for i in devices]}

    def sample(
        self, model, examples: list[dict[str, Any]], tokenizer, max_length: int, source: str
    ) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """``examples`` with their completions written by ``model`` (a whole model: under ZeRO-3 the trainer gathers
        it first, so no rank waits on another); and what the sampling took."""
        s = self.settings
        prompts = [e["input_ids"][: e["prompt_length"]] for e in examples]
        budget = max(1, min(s.max_new_tokens, max_length - min(len(p) for p in prompts)))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        was_training = model.training
        model.eval()
        began = time.perf_counter()
        with self.own_rng():
            samples = generate_tokens(
                model,
                prompts,
                pad_token_id=pad,
                eos_token_ids=stop_token_ids(model, tokenizer),
                max_new_tokens=budget,
                temperature=s.temperature,
                top_p=s.top_p,
                top_k=s.top_k,
                generation_kwargs=s.generation_kwargs,
            )
        seconds = time.perf_counter() - began
        built = []
        for example, prompt, sample in zip(examples, prompts, samples):
            tokens = (prompt + sample.tokens)[:max_length]
            written = {
                "input_ids": tokens,
                "labels": [IGNORE_INDEX] * len(prompt) + tokens[len(prompt) :],
                "sample_id": example["sample_id"],
                # `ce` on the student's own samples teaches nothing; on the teacher's it is sequence-level KD.
                "loss_weight": 0.0 if source == STUDENT else example.get("loss_weight", 1.0),
                "prompt_length": len(prompt),
                "has_completion": True,
            }
            if PROMPT_IDS in example:  # across tokenizers: the teacher's tokens of the prompt (replay, resume)
                written[PROMPT_IDS] = example[PROMPT_IDS]
            built.append(written)
        new_tokens = [len(b["input_ids"]) - b["prompt_length"] for b in built]
        self.counts[source] += 1
        self.counts["generated_tokens"] += sum(new_tokens)
        stats = {"on_policy/sample_seconds": seconds, "on_policy/sampled_length": sum(new_tokens) / len(built)}
        if source == STUDENT:
            self.remember(built)
            stats["on_policy/student_logprob"] = sampled_logprob_sum(model, built, pad) / max(sum(new_tokens), 1)
        model.train(was_training)
        return built, stats

    # -- replay ------------------------------------------------------------------------------------------------

    def remember(self, examples: list[dict[str, Any]]) -> None:
        self.buffer.extend(examples)
        del self.buffer[: max(0, len(self.buffer) - self.settings.replay_buffer_size)]

    def replay(self, batch_size: int) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """``batch_size`` earlier student samples from the buffer (indices drawn identically on every rank)."""
        chosen = torch.randperm(len(self.buffer), generator=self.draws)[:batch_size].tolist()
        self.counts[REPLAY] += 1
        picked = [self.buffer[i] for i in chosen]
        lengths = [len(e["input_ids"]) - e["prompt_length"] for e in picked]
        return picked, {"on_policy/sample_seconds": 0.0, "on_policy/sampled_length": sum(lengths) / len(picked)}

    # -- checkpoints -------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "draws": self.draws.get_state(),
            "sampler_state": self.sampler_state,
            "buffer": self.buffer,
            "counts": dict(self.counts),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.draws.set_state(state["draws"])
        self.sampler_state = state["sampler_state"]
        self.buffer = list(state["buffer"])
        self.counts = dict(state["counts"])

    def save(self, directory: Path) -> None:
        """This rank's state into a checkpoint directory being written (every rank calls it)."""
        torch.save(self.state_dict(), directory / STATE_FILE.format(rank=self.rank))

    def load(self, directory: Path) -> bool:
        """This rank's state from a checkpoint; False when it has none (written by fewer processes, or before
        on-policy training was configured): sampling then starts from the seed."""
        path = directory / STATE_FILE.format(rank=self.rank)
        if not path.is_file():
            return False
        self.load_state_dict(torch.load(path, weights_only=True))
        return True


def sampled_logprob_sum(model, examples: list[dict[str, Any]], pad_token_id: int) -> float:
    """The sum of the log-probabilities (T = 1) ``model`` gives the completion tokens of ``examples``: one forward
    pass without gradients, then the chunked head, so no ``[batch, tokens, vocabulary]`` logits exist."""
    batch = collate(examples, pad_token_id)  # right-padded: causal attention never sees the padding
    input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    device = next(model.parameters()).device
    with torch.no_grad():
        hidden = model.get_decoder()(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False
        ).last_hidden_state
    counted = (labels[:, 1:] != IGNORE_INDEX).to(device)  # hidden state t predicts token t + 1
    targets = labels[:, 1:].to(device)[counted]
    return float(chunked_token_logprobs(hidden[:, :-1][counted], output_head(model), targets).sum())


@contextlib.contextmanager
def unwrapped_for_generation(prepared, accelerator: Accelerator) -> Iterator[Any]:
    """The plain module of a prepared (DDP / DeepSpeed) model, with ZeRO-3 weights gathered for the block (trl
    1.16's ``unwrap_model_for_generation``; a plain module as it is), under the training's autocast: the plain
    module's forward is not the one accelerate wrapped in autocast, so bf16 mixed precision is entered here."""
    from accelerate.utils import DistributedType

    with accelerator.autocast():
        if accelerator.distributed_type == DistributedType.NO or not hasattr(prepared, "module"):
            yield prepared
            return
        from trl.models.utils import unwrap_model_for_generation

        with unwrap_model_for_generation(prepared, accelerator) as model:
            yield model
