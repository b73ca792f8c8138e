"""Keeping credentials out of everything a command saves or prints.

Three kinds of secret reach a command: an API key (read from the environment variable a config *names*, never from
the config itself), credentials written into a URL (``http://user:key@proxy/v1``, ``...?api-key=KEY``,
``...#access_token=KEY``: the usual ways through an authenticating proxy or a signed endpoint) and HTTP headers given
in a config (``teacher.headers``). The live client uses them as given; every copy that is saved or printed goes
through here:

* :func:`redact_urls`: the user info of every URL in a text becomes ``user:***@`` (or ``***@`` when there is no
  password, since a lone user part is then usually the token itself), and the value of every query or fragment
  parameter whose name says secret (key, token, sig, secret, password, auth, credential, session, ...) or whose value
  has a key's shape becomes ``***``. :func:`kd_core.config.to_dict` applies it to every string of a config, so every
  saved ``config.yaml`` is covered whatever the field is called, and drops the values of header fields;
* :func:`scrub`: a text (a server's error message, a body echoed back) with each given secret replaced by ``***`` and
  URL user info redacted; :func:`url_secrets` lists the secrets a URL carries, to pass along with the API key;
* :func:`check_env_var_name`: refuses a key pasted where the *name* of its variable is expected, without echoing it.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote

MASK = "***"

# scheme://userinfo@ -- the user info runs to the last '@' before the host ends ('/', '?', '#' or whitespace), as in
# urllib.parse.urlsplit, so an unescaped '@' inside a password is still covered.
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^\s/?#]*)@")

# Secrets shorter than this are not replaced inside free text: a key is far longer, and masking every "pw" or "a"
# in a message would garble it. URL user info is redacted by position whatever its length.
MIN_SECRET_LENGTH = 4

_ENV_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Key shapes that are also valid variable names (or start like one), so the name rule alone would let them through:
# OpenAI/Anthropic/Stripe-style sk-/pk-/rk-, Hugging Face hf_, GitHub gh?_/github_pat_, AWS access key ids, Slack
# xox?-, Google AIza.
_KEY_SHAPES = re.compile(
    r"(?:sk|pk|rk)[-_]\w|hf_[A-Za-z0-9]{16,}$|gh[pousr]_[A-Za-z0-9]{16,}$|github_pat_\w{16,}$|(?:AKIA|ASIA)[0-9A-Z]{16}$"
    r"|xox[abprs]-|AIza[0-9A-Za-z_-]{30,}$"
)


# A URL's query and fragment: from '?' or '#' to the end of the URL (whitespace, a quote or a bracket ends it).
_URL_TAIL = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>?#]*)(?P<tail>[?#][^\s'\"<>]*)")
_PARAM = re.compile(r"(?P<name>[^&;=?#]+)=(?P<value>[^&;#]*)")
# Words in a parameter's name that mark its value as a credential (compared lower-case, '-' and '_' removed):
# api-key, key, access_token, X-Amz-Signature, sig (Azure SAS), client_secret, password, auth, session ids...
_SECRET_PARAM_WORDS = ("key", "token", "secret", "sig", "pass", "pwd", "auth", "credential", "session", "cookie")
# A bare fragment this long (``#<token>``, an OAuth implicit grant) is a credential rather than an anchor.
_BARE_FRAGMENT_SECRET = 16


def _mask_userinfo(match: re.Match[str]) -> str:
    user, colon, _ = match["userinfo"].partition(":")
    return f"{match['scheme']}{user}:{MASK}@" if colon and user else f"{match['scheme']}{MASK}@"


def _secret_param(name: str, value: str) -> bool:
    bare = unquote(name).lower().replace("-", "").replace("_", "")
    return (
        bool(value)
        and value != MASK
        and (any(word in bare for word in _SECRET_PARAM_WORDS) or key_shaped(unquote(value)))
    )


def _tail_secrets(tail: str) -> list[str]:
    """The secret values of a URL's query and fragment (``?a=1&api-key=K#access_token=T``)."""
    query, _, fragment = tail.lstrip("?").partition("#") if tail.startswith("?") else ("", "", tail[1:])
    found = [
        m["value"] for part in (query, fragment) for m in _PARAM.finditer(part) if _secret_param(m["name"], m["value"])
    ]
    if fragment and "=" not in fragment and len(fragment) >= _BARE_FRAGMENT_SECRET:
        found.append(fragment)
    return found


def _mask_tail(match: re.Match[str]) -> str:
    tail = match["tail"]
    for secret in sorted(set(_tail_secrets(tail)), key=len, reverse=True):
        tail = re.sub(rf"(?<=[=#]){re.escape(secret)}(?=$|[&;#])", MASK, tail)
    return match["head"] + tail


def redact_urls(text: str) -> str:
    """``text`` with the credentials of every URL in it masked: ``http://user:***@host/v1``, ``http://***@host/v1``,
    ``http://host/v1?api-key=***&n=2``, ``http://host/cb#access_token=***``."""
    if "@" in text:
        text = _URL_USERINFO.sub(_mask_userinfo, text)
    return _URL_TAIL.sub(_mask_tail, text) if "://" in text else text


def redact_value(value: Any) -> Any:
    """:func:`redact_urls` applied to every string in ``value`` (strings, lists, tuples and dicts, recursively)."""
    if isinstance(value, str):
        return redact_urls(value)
    if isinstance(value, (list, tuple)):
        return type(value)(redact_value(v) for v in value)
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    return value


def url_secrets(url: str | None) -> list[str]:
    """The secrets the URL carries: its query and fragment secrets (see :func:`redact_urls`) and, from its user info,
    the password (or a lone user part), raw and percent-decoded, and the ``Basic`` credentials an HTTP client
    derives from them (httpx sends ``Authorization: Basic base64(user:pass)`` for such a URL, and a server may echo
    that header back)."""
    if not url:
        return []
    found: list[str] = []
    for match in _URL_USERINFO.finditer(url):
        userinfo = match["userinfo"]
        user, colon, password = userinfo.partition(":")
        for raw in [password] if colon and password else [userinfo]:
            found += [raw, unquote(raw)]
        basic = f"{unquote(user)}:{unquote(password)}" if colon else f"{unquote(user)}:"
        found.append(base64.b64encode(basic.encode()).decode())
    for match in _URL_TAIL.finditer(url):  # a client may quote the URL, or the value decoded, in its errors
        found += [v for secret in _tail_secrets(match["tail"]) for v in (secret, unquote(secret))]
    return list(dict.fromkeys(s for s in found if s))


def scrub(text: str, secrets: Iterable[str | None]) -> str:
    """``text`` (an error message, a server's body) with every secret replaced by ``***`` and URL user info masked.

    Longer secrets go first, so a secret that contains another is masked whole; secrets shorter than
    :data:`MIN_SECRET_LENGTH` are left to the URL rule.
    """
    for secret in sorted({s for s in secrets if s and len(s) >= MIN_SECRET_LENGTH}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return redact_urls(text)


def key_shaped(value: str) -> bool:
    """Whether ``value`` has the shape of an API key: a known provider prefix, or a long random run of letters and
    digits without a word separator (mixed case: base62 keys; one case with digits: hex keys of many providers)."""
    if _KEY_SHAPES.match(value):
        return True
    if len(value) < 20 or "_" in value or not value.isalnum() or not any(c.isdigit() for c in value):
        return False
    mixed = any(c.islower() for c in value) and any(c.isupper() for c in value)
    return mixed and len(value) >= 32 or len(value) >= 24


def looks_like_key(value: str) -> bool:
    """Whether ``value``, given where an environment variable's *name* belongs, is rather a key itself."""
    return not _ENV_VAR_NAME.fullmatch(value) or key_shaped(value)


def check_env_var_name(field: str, value: str | None) -> None:
    """Raises ValueError (one line, the value not shown) when ``value`` looks like a key rather than a variable name."""
    if value is not None and not value.strip():
        raise ValueError(f"{field}: expected the NAME of an environment variable (like OPENAI_API_KEY), or null")
    if value is not None and looks_like_key(value):
        raise ValueError(
            f"{field}: expected the NAME of an environment variable (like OPENAI_API_KEY), got what looks like a key "
            "itself (not shown); export the key in a variable and name that variable here"
        )
