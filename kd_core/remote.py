"""What every call to a remote teacher shares, whichever stage makes it: the two kinds of failure, the API key, the
base URL's query, and how the ``openai`` client's exceptions map onto those two kinds.

Data generation (``data_gen.backends``) and the served teacher of distillation (:mod:`kd_core.served`) both raise
:class:`TransientError` (retry with backoff: 429, 5xx, timeouts, cut connections, malformed answers) or
:class:`FatalError` (retrying cannot help: bad request, wrong key, unknown model), so one retry loop and one adaptive
concurrency limit (:mod:`kd_core.limiter`) serve both.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from kd_core.config import ConfigError


class TransientError(Exception):
    """A failure worth retrying: 429, 5xx, timeout, connection error, malformed answer."""

    def __init__(self, reason: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after


class FatalError(Exception):
    """A failure that retrying cannot fix (bad request, wrong key, unknown model)."""


def resolve_api_key(api_key_env: str | None, field: str = "teacher.api_key_env") -> str:
    """The key from the named environment variable; a dummy key when no variable is configured (no-auth server)."""
    if api_key_env is None:
        return "no-key"  # the openai client insists on a non-empty key even when the server ignores it
    key = os.environ.get(api_key_env)
    if not key:
        raise ConfigError(
            f"{field}: environment variable {api_key_env} is not set "
            f"(export it, or set {field}: null for a server without auth)"
        )
    return key


def split_query(url: str | None) -> tuple[str | None, dict[str, str]]:
    """``url`` without its query and fragment, and the query's parameters. The openai client (3.57) appends the
    endpoint's path to the base URL as a string, so a query left in it (``/v1?api-key=K``) would end up before the
    path; it goes to ``default_query`` instead, which sends it with every call. A fragment is never sent over HTTP."""
    if not url or ("?" not in url and "#" not in url):
        return url, {}
    from urllib.parse import parse_qsl, urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit(parts._replace(query="", fragment="")), dict(parse_qsl(parts.query, keep_blank_values=True))


def retry_after_seconds(headers: Any) -> float | None:
    """Seconds from ``retry-after-ms`` or ``retry-after`` (numeric form; servers in practice send seconds)."""
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name) if headers is not None else None
        if value is None:
            continue
        try:
            return max(0.0, float(value) * scale)
        except ValueError:
            continue
    return None


@contextlib.contextmanager
def openai_errors() -> Iterator[None]:
    """Turns the ``openai`` client's exceptions (openai 3.54-3.60) raised inside the block into
    :class:`TransientError` or :class:`FatalError`."""
    import openai

    try:
        yield
    except openai.APITimeoutError as err:  # subclass of APIConnectionError: test it first
        raise TransientError("timeout", f"timed out: {err}") from None
    except openai.APIConnectionError as err:
        raise TransientError("connection", f"connection error: {err}") from None
    except openai.APIStatusError as err:
        retry_after = retry_after_seconds(err.response.headers)
        if err.status_code == 429:
            raise TransientError("429", f"rate limited: {err.message}", retry_after) from None
        if err.status_code >= 500 or err.status_code == 408:
            raise TransientError(f"{err.status_code}", f"server error {err.status_code}", retry_after) from None
        raise FatalError(f"teacher refused the request (HTTP {err.status_code}): {err.message}") from None
    except (openai.APIResponseValidationError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        raise TransientError("malformed", f"malformed answer: {err}") from None
    except openai.APIError as err:  # an {"error": ...} event in a stream (the other subclasses are caught above)
        raise TransientError("stream_error", f"error event in the stream: {err.message}") from None
