"""What a data row must hold, checked before it is tokenized: its shape (detected from the first row, required of
every row), the types of its columns, the teacher's own token ids when it carries them, and its ``ce`` weight field.
Every failure is one ConfigError naming the row (``file:line`` or ``file: row N``) and the field."""

from __future__ import annotations

import typing
from typing import Any

from kd_core.config import ConfigError

ROLES = ("system", "user", "assistant", "tool")
NEEDED = {
    "messages": ["messages"],
    "prompt_completion": ["prompt", "completion"],
    "text": ["text"],
    "prompt": ["prompt"],
}


def detect_shape(record: dict[str, Any], requested: str, source: str) -> str:
    if requested != "auto":
        missing = [c for c in NEEDED[requested] if c not in record]
        if missing:
            raise ConfigError(f"{source}: format {requested!r} needs column(s) {missing}; found {sorted(record)}")
        return requested
    # A null column is one this row does not have: tables (parquet, or JSON lines whose rows differ) fill them in.
    present = {key for key, value in record.items() if value is not None}
    if "messages" in present:
        return "messages"
    if "prompt" in present and "completion" in present:
        return "prompt_completion"
    if "text" in present:
        return "text"
    if "prompt" in present:
        return "prompt"
    raise ConfigError(
        f"{source}: no usable column; expected `messages`, `prompt` and `completion`, `text`, or `prompt` alone, "
        f"found {sorted(record)}"
    )


def _kind(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"[:80]


def row_ce_weight(record: dict[str, Any], field: str, where: str) -> float:
    """The row's ``data.ce_weight_field`` value (1 when the row has none); ConfigError naming ``where`` otherwise."""
    value = record.get(field, 1.0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < float("inf"):
        raise ConfigError(f"{where}: field {field!r} (data.ce_weight_field): expected a number >= 0, got {value!r}")
    return float(value)


def check_record(record: dict[str, Any], shape: str, where: str, first: str | None = None) -> None:
    """Raises ConfigError naming ``where`` (``file:line``, or ``file: row N``) and the field when a record does not
    have the types its shape needs: a list of {role, content} messages with known roles, or string
    prompt/completion/text. ``first`` (where the shape was detected) makes a row of another shape an error of its
    own: it names this row, its shape and the one expected."""

    def fail(problem: str) -> typing.NoReturn:
        raise ConfigError(f"{where}: {problem}")

    if first is not None:
        own = detect_shape(record, "auto", where)
        if own != shape:
            fail(
                f"this row has the {own!r} shape (columns {NEEDED[own]}), but the data's shape is {shape!r}, "
                f"detected from its first row ({first}): expected column(s) {NEEDED[shape]} in every row"
            )
    if shape == "messages":
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages:
            fail(f"field 'messages': expected a non-empty list of {{role, content}} messages, got {_kind(messages)}")
        for turn, message in enumerate(messages):
            field = f"messages[{turn}]"
            if not isinstance(message, dict):
                fail(f"field '{field}': expected a {{role, content}} message, got {_kind(message)}")
            for key in ("role", "content"):
                if message.get(key) is None:
                    fail(f"field '{field}': the message has no '{key}' (expected {{role, content}})")
            if not isinstance(message["role"], str):
                fail(f"field '{field}.role': expected a string, got {_kind(message['role'])}")
            if message["role"] not in ROLES:
                # A misspelt role ("assitant") would otherwise be rendered by the chat template as some other turn
                # (or dropped) and train silently on the wrong targets.
                fail(f"field '{field}.role': unknown role {message['role']!r}; expected one of {', '.join(ROLES)}")
            if not isinstance(message["content"], (str, list)):
                fail(f"field '{field}.content': expected text, got {_kind(message['content'])}")
        return
    for key in NEEDED[shape]:
        if not isinstance(record.get(key), str):
            fail(f"field '{key}': expected a string, got {_kind(record.get(key))}")


def check_completion_ids(record: dict[str, Any], shape: str, vocab: int, where: str) -> None:
    """ConfigError naming ``where`` unless ``completion_token_ids`` (when present) is a list of ids below ``vocab``
    completing a prompt (a final assistant turn, or a completion)."""
    ids = record.get("completion_token_ids")
    if ids is None:
        return
    if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
        raise ConfigError(f"{where}: field 'completion_token_ids': expected a non-empty list of token ids < {vocab}")
    if shape == "messages" and record["messages"][-1].get("role") != "assistant":
        raise ConfigError(f"{where}: field 'completion_token_ids': the messages end without an assistant turn")
