"""What the engine's users hand it and get back: a :class:`Request` per teacher call, a :class:`Result` per answer,
the errors that stop a run, and the cost plan checked before any call is made (:func:`preflight`).

Pipelines import these from :mod:`data_gen.engine`, which runs them; they live here so the engine's file holds the
running alone.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from data_gen.config import TeacherConfig


class ParseError(Exception):
    """Raised by a pipeline's parse function; ``reason`` names the rejection in the stats (e.g. 'no_json')."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class EngineError(Exception):
    """The run cannot continue (teacher unreachable after retries, request refused); saved work is kept."""


class BudgetError(EngineError):
    """The cost estimate already exceeds ``max_cost_usd``: nothing was called."""


ParseFn = Callable[[str, str], Any]


@dataclass
class Request:
    """One teacher call. ``id`` must be stable across reruns; ``sample`` distinguishes samples of one prompt."""

    id: str
    messages: list[dict[str, str]]
    sample: int = 0
    decoding: dict[str, Any] = field(default_factory=dict)  # per-request overrides of TeacherConfig.decoding
    meta: dict[str, Any] = field(default_factory=dict)  # carried through untouched for the pipeline
    parse: ParseFn | None = None  # overrides the parse function given to run()/map() for this request


@dataclass
class CallPlan:
    """A line of the pre-flight estimate: ``calls`` new calls of about this many tokens each."""

    label: str
    calls: int
    input_tokens: int
    output_tokens: int | None = None  # None = decoding.max_tokens, the worst case


@dataclass
class Result:
    """The answer to a request. ``error`` is None, or 'parse:<reason>' when every parse attempt failed."""

    request: Request
    text: str | None
    finish_reason: str | None
    parsed: Any = None
    error: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    cached: bool = False
    attempts: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    started: float = 0.0
    finished: float = 0.0
    token_ids: list[int] | None = None  # with teacher.logprobs: the answer's generated ids
    logprobs_key: str | None = None  # and the answer cache's key of its log-probabilities

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Stats:
    """Counters shown in the progress bar and the final summary."""

    calls: int = 0
    cached: int = 0
    retries: Counter[str] = field(default_factory=Counter)
    rejections: Counter[str] = field(default_factory=Counter)
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    truncated: int = 0


def estimate_cost(cfg: TeacherConfig, plan: list[CallPlan]) -> float:
    """Upper-bound cost of the planned new calls (output at ``max_tokens`` unless a plan line says otherwise)."""
    total = 0.0
    for item in plan:
        out = cfg.decoding.max_tokens if item.output_tokens is None else item.output_tokens
        total += item.calls * (item.input_tokens * cfg.price_input_per_m + out * cfg.price_output_per_m) / 1e6
    return total


def preflight(cfg: TeacherConfig, plan: list[CallPlan], *, quiet: bool = False) -> float:
    """Prints the estimate; raises BudgetError (exit 2) when it alone exceeds ``max_cost_usd``.

    Needs no engine, so a pipeline can call it before it creates anything on disk.
    """
    estimate = estimate_cost(cfg, plan)
    budget = "none" if cfg.max_cost_usd is None else f"${cfg.max_cost_usd:.4f}"
    if not quiet:
        for item in plan:
            out = cfg.decoding.max_tokens if item.output_tokens is None else item.output_tokens
            print(
                f"estimate: {item.label}: ~{item.calls} calls x ({item.input_tokens} in + <= {out} out tokens)",
                flush=True,
            )
        print(f"estimate: at most ${estimate:.4f} for new calls (budget {budget}; cached answers are free)", flush=True)
    if cfg.max_cost_usd is not None and estimate > cfg.max_cost_usd:
        raise BudgetError(
            f"teacher.max_cost_usd: the estimated cost ${estimate:.4f} exceeds the budget "
            f"${cfg.max_cost_usd:.4f}; raise the budget or lower the target"
        )
    return estimate
