"""Typed settings of the teacher engine, shared by every generation pipeline (``teacher:`` and ``output:`` sections).

A pipeline config embeds :class:`TeacherConfig` and :class:`OutputConfig` with ``section(...)``; the engine is
built from them by :func:`data_gen.engine.build_engine`. The API key itself never appears in a config: only the
*name* of the environment variable that holds it (``api_key_env``; a value that looks like a key is refused), so
``save_config`` can write the resolved config beside the data without leaking a secret. Credentials in ``base_url``
(``http://user:key@proxy/v1``) reach the client as given and are masked in every saved or printed copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from kd_core.config import option, section
from kd_core.redact import check_env_var_name


@dataclass
class DecodingConfig:
    """Sampling parameters sent with every call (part of the cache key)."""

    temperature: float = option(0.7, help="sampling temperature; 0 = greedy")
    top_p: float = option(1.0, help="nucleus sampling mass")
    max_tokens: int = option(512, help="maximum new tokens per answer")
    stop: list[str] = option([], help="stop sequences (API backend)")
    seed: int | None = option(None, help="per-call seed sent to the server (OpenAI 'seed'); local backend seeds torch")
    generation_kwargs: dict[str, Any] = option(
        {},
        help="local backend: transformers GenerationConfig settings to switch on, e.g. {repetition_penalty: 1.1}; "
        "every other knob the model's generation_config.json sets (repetition penalty, min_p, n-gram bans, ...) is "
        "neutral",
    )

    def __post_init__(self) -> None:
        if self.generation_kwargs:  # imports transformers: only when set (an API run need not pay for it)
            from kd_core.generation import check_generation_kwargs

            check_generation_kwargs(self.generation_kwargs, "generation_kwargs")
        if self.temperature < 0:
            raise ValueError("temperature: expected >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p: expected a value in (0, 1]")
        if self.max_tokens < 1:
            raise ValueError("max_tokens: expected >= 1")


@dataclass
class TeacherConfig:
    """Which teacher answers, how fast we may call it, what it costs."""

    backend: Literal["api", "local"] = option("api", help="'api': OpenAI-compatible server; 'local': transformers")
    model: str = option(
        "", help="model name sent to the API, or a local model directory or .gguf file for backend=local"
    )
    base_url: str | None = option(None, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1; None = OpenAI")
    api_key_env: str | None = option(
        "OPENAI_API_KEY", help="name of the environment variable holding the key; None = no auth (local server)"
    )
    headers: dict[str, str] = option(
        {},
        help="api backend: extra HTTP headers sent with every call (an authenticating gateway's, e.g. "
        "{X-Api-Key: ...}); their values are masked in every saved config and scrubbed from every printed line",
    )
    decoding: DecodingConfig = section(DecodingConfig, help="sampling parameters")
    concurrency: int = option(
        16, help="maximum requests in flight (the local backend keeps at least batch_size in flight, so batches fill)"
    )
    adaptive_concurrency: bool = option(
        True,
        help="api backend: keep between min_concurrency and concurrency requests in flight, following the "
        "server (halved on timeouts, 429/503/504 and queueing; grown while answers come back in time)",
    )
    min_concurrency: int = option(1, help="api backend: the adaptive limit's floor (and where it starts)")
    queue_latency_factor: float | None = option(
        5.0,
        help="a streamed answer whose first token came this many times later than the fastest first token "
        "seen waited in the server's queue: the adaptive limit is halved; null = only timeouts and 429/503/504 count",
    )
    stream: bool = option(
        True,
        help="api backend: stream answers, so a call given up on closes its connection and the server stops "
        "generating it (transformers serve, vLLM); timeout_s then bounds each wait for the next chunk, not the answer",
    )
    requests_per_minute: float | None = option(None, help="request-rate limit; None = unlimited")
    tokens_per_minute: float | None = option(None, help="token-rate limit (prompt + max_tokens); None = unlimited")
    timeout_s: float = option(
        120.0, help="per-request timeout; with stream: the longest wait for the first token or between two chunks"
    )
    max_retries: int = option(6, help="retries on 429/5xx/timeouts/connection errors/malformed answers")
    max_parse_retries: int = option(2, help="extra calls when the pipeline cannot parse an answer")
    backoff_base_s: float = option(1.0, help="first backoff delay; doubles each retry, with full jitter")
    backoff_max_s: float = option(60.0, help="largest backoff delay")
    price_input_per_m: float = option(0.0, help="USD per 1M input tokens")
    price_output_per_m: float = option(0.0, help="USD per 1M output tokens")
    max_cost_usd: float | None = option(None, help="hard budget: stop cleanly before spending more; None = no cap")
    cache_path: str | None = option(None, help="SQLite answer cache; None = <output.dir>/cache.sqlite")
    batch_size: int = option(8, help="local backend: prompts per generate() call")
    device: str = option("cpu", help="local backend: torch device ('cuda' picks the process's local GPU)")
    dtype: Literal["float32", "bfloat16", "float16"] = option("float32", help="local backend: weights dtype")
    logprobs: int | None = option(
        None,
        help="api backend: capture the top-K log-probabilities of every generated token (vLLM/SGLang: tokens as "
        "ids, K up to the server's --max-logprobs) into <output.dir>/teacher_store for `distill train "
        "--loss.teacher_store`; null = off",
    )
    tokenizer: str | None = option(
        None,
        help="with logprobs: the teacher's tokenizer (a local model directory or .gguf), checked against the "
        "server's before the first call; the store is written for it, so the student must share it",
    )

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model: expected a model name (api) or a model directory (local)")
        # A key pasted here would be saved in config.yaml: refuse it, without echoing it.
        check_env_var_name("api_key_env", self.api_key_env)
        if self.concurrency < 1:
            raise ValueError("concurrency: expected >= 1")
        if not 1 <= self.min_concurrency <= self.concurrency:
            raise ValueError(f"min_concurrency: expected 1 <= min_concurrency <= concurrency ({self.concurrency})")
        if self.queue_latency_factor is not None and self.queue_latency_factor <= 1:
            raise ValueError("queue_latency_factor: expected a number > 1 or null")
        for name in ("requests_per_minute", "tokens_per_minute", "max_cost_usd"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name}: expected a positive number or null")
        if self.timeout_s <= 0:
            raise ValueError("timeout_s: expected > 0")
        if self.max_retries < 0 or self.max_parse_retries < 0:
            raise ValueError("max_retries: expected >= 0")
        if self.price_input_per_m < 0 or self.price_output_per_m < 0:
            raise ValueError("price_input_per_m: expected >= 0")
        if self.batch_size < 1:
            raise ValueError("batch_size: expected >= 1")
        if self.logprobs is not None:
            if self.logprobs < 1:
                raise ValueError("logprobs: expected K >= 1 (log-probabilities per generated token) or null")
            if self.backend != "api":
                raise ValueError("logprobs: captured from a served teacher; set backend: api (vLLM, SGLang)")
            if not self.tokenizer:
                raise ValueError("tokenizer: teacher.logprobs needs the teacher's tokenizer (a model dir or .gguf)")
        if self.backend == "api" and self.decoding.generation_kwargs:
            raise ValueError(
                "decoding.generation_kwargs: transformers settings of the local backend; an API server "
                "takes only temperature, top_p, max_tokens, stop and seed"
            )

    @property
    def in_flight(self) -> int:
        """Calls the engine keeps in flight. The local backend batches whatever is in flight, so a concurrency below
        ``batch_size`` would silently shrink every batch to ``concurrency`` prompts."""
        return max(self.concurrency, self.batch_size) if self.backend == "local" else self.concurrency


@dataclass
class OutputConfig:
    """Where records go and in which formats."""

    dir: str = option("", help="output directory (journal, cache, data files, dataset card)")
    formats: list[str] = option(["jsonl", "parquet"], help="data files to write: jsonl and/or parquet")
    progress: bool = option(True, help="show a tqdm progress bar")

    def __post_init__(self) -> None:
        if not self.dir:
            raise ValueError("dir: expected an output directory")
        unknown = set(self.formats) - {"jsonl", "parquet"}
        if unknown or not self.formats:
            raise ValueError(f"formats: expected a non-empty subset of ['jsonl', 'parquet'], got {self.formats}")
