"""kd_core.redact: URL user info masked in any text and in every saved config field, secrets scrubbed from server
messages, and a key pasted where an environment variable's name belongs recognised (without being echoed)."""

from __future__ import annotations

import base64
from dataclasses import dataclass

import pytest
import yaml

from kd_core.config import ConfigError, from_dict, option, save_config, section, to_dict
from kd_core.redact import check_env_var_name, looks_like_key, redact_urls, redact_value, scrub, url_secrets


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://user:key@host/v1", "http://user:***@host/v1"),
        ("https://sk-abc123@host:8443/v1", "https://***@host:8443/v1"),  # a lone user part is the token itself
        ("http://:pw@host/", "http://***@host/"),
        ("http://u:p@ss@host/v1?a=b", "http://u:***@host/v1?a=b"),  # an unescaped '@' in the password
        (
            "error at 'http://u:k@h/v1': refused; retry http://u:k@h2/v1",
            "error at 'http://u:***@h/v1': refused; retry http://u:***@h2/v1",
        ),
        ("http://host:8000/v1, mail a@b.c", "http://host:8000/v1, mail a@b.c"),  # no user info: untouched
        ("plain text", "plain text"),
        ("http://h:8/v1?api-key=ABC123def&n=2", "http://h:8/v1?api-key=***&n=2"),
        (
            "at 'http://h/v1?key=k3y&token=t0k&access_token=a&sig=s%2F&X-Amz-Signature=f00': refused",
            "at 'http://h/v1?key=***&token=***&access_token=***&sig=***&X-Amz-Signature=***': refused",
        ),
        ("https://h/cb#access_token=T0ken&state=4", "https://h/cb#access_token=***&state=4"),
        ("https://h/cb#abcdefghijklmnop1234 and http://h/doc#intro", "https://h/cb#*** and http://h/doc#intro"),
        ("http://u:p@h/v1?x=sk-live-0123456789&q=hello", "http://u:***@h/v1?x=***&q=hello"),  # a key's shape, any name
    ],
)
def test_redact_urls(text, expected):
    assert redact_urls(text) == expected
    assert redact_urls(expected) == expected  # idempotent


def test_url_secrets_and_scrub():
    url = "http://proxyuser:s3cret%2Fpass@host/v1"
    secrets = url_secrets(url)
    basic = base64.b64encode(b"proxyuser:s3cret/pass").decode()
    assert secrets == ["s3cret%2Fpass", "s3cret/pass", basic]
    assert url_secrets(None) == [] and url_secrets("http://host/v1") == []
    assert url_secrets("http://h/v1?api-key=a%2Fb1&n=2#access_token=t0k3n") == ["a%2Fb1", "a/b1", "t0k3n"]
    message = f"bad key sk-live-XYZ123 (Basic {basic}; s3cret/pass) at {url}"
    assert (
        scrub(message, ["sk-live-XYZ123", *secrets]) == "bad key *** (Basic ***; ***) at http://proxyuser:***@host/v1"
    )
    assert scrub("a pw in a sentence", ["pw", None, ""]) == "a pw in a sentence"  # too short to mask in free text
    assert scrub("key sk-abcdef and sk-abcdef-longer", ["sk-abcdef", "sk-abcdef-longer"]) == "key *** and ***"


@dataclass
class Inner:
    url: str | None = option(None)
    mirrors: list[str] = option([])
    headers: dict[str, str] = option({})


@dataclass
class Outer:
    base_url: str = option("http://u:topsecret@proxy/v1")
    api_key: str = option("sk-never")
    inner: Inner = section(Inner)


def test_saved_configs_mask_url_credentials_in_every_field(tmp_path):
    cfg = Outer(
        inner=Inner(
            url="https://tok3n@hub/x",
            mirrors=["http://a:b1b2@m/v1", "http://m2/v1"],
            headers={"via": "http://p:q1q2@gw/"},
        )
    )
    saved = to_dict(cfg)
    assert saved == {
        "base_url": "http://u:***@proxy/v1",
        "inner": {
            "url": "https://***@hub/x",
            "mirrors": ["http://a:***@m/v1", "http://m2/v1"],
            "headers": {"via": "***"},
        },
    }  # every header value, URL or not
    assert to_dict(cfg, redact=False)["base_url"] == "http://u:topsecret@proxy/v1"  # the live value is kept
    assert cfg.base_url == "http://u:topsecret@proxy/v1"
    text = save_config(cfg, tmp_path / "config.yaml").read_text()
    for secret in ("topsecret", "tok3n", "b1b2", "q1q2", "sk-never"):
        assert secret not in text
    assert yaml.safe_load(text)["inner"]["mirrors"][1] == "http://m2/v1"
    assert redact_value(("http://a:b@h",)) == ("http://a:***@h",)


@pytest.mark.parametrize("name", ["OPENAI_API_KEY", "HF_TOKEN", "DISTILL_TEST_KEY", "my_key", "_K1", "SK_NAME"])
def test_variable_names_are_accepted(name):
    assert not looks_like_key(name)
    check_env_var_name("teacher.api_key_env", name)
    check_env_var_name("teacher.api_key_env", None)


@pytest.mark.parametrize(
    "value",
    [
        "sk-proj-Abc123",
        "sk_live_abcdef",
        "hf_AbCdEfGhIjKlMnOpQrSt",
        "ghp_abcdefghijklmnopqrstuvwxyz12",
        "AKIAIOSFODNN7EXAMPLE",
        "xoxb-123-456",
        "AIzaSyA1234567890abcdefghijklmnopqrstu",
        "key with spaces",
        "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3z",  # a long random token that happens to be a valid name
        "0f3a9c2e7b1d4f6a8c0e2b4d6f8a1c3e",
        "0F3A9C2E7B1D4F6A8C0E2B4D",  # hex keys, either case
    ],
)
def test_key_shaped_values_are_refused_without_echo(value):
    assert looks_like_key(value)
    with pytest.raises(ValueError) as caught:
        check_env_var_name("teacher.api_key_env", value)
    message = str(caught.value)
    assert "\n" not in message and value not in message and value[:6] not in message
    assert message.startswith("teacher.api_key_env: expected the NAME of an environment variable")


@dataclass
class Teacherish:
    api_key_env: str | None = option("OPENAI_API_KEY")

    def __post_init__(self) -> None:
        check_env_var_name("api_key_env", self.api_key_env)


@dataclass
class Root:
    teacher: Teacherish = section(Teacherish)


def test_config_error_names_the_field():
    with pytest.raises(ConfigError, match=r"^teacher: api_key_env: expected the NAME") as caught:
        from_dict(Root, {"teacher": {"api_key_env": "sk-abcdef123456"}})
    assert "sk-abc" not in str(caught.value)
    with pytest.raises(ConfigError, match="or null"):
        from_dict(Root, {"teacher": {"api_key_env": ""}})


@dataclass
class WithEnvs:
    hf_token_env: str | None = option(None)
    tracker_key_env: str | None = option(None)


def test_a_key_in_any_env_field_is_refused_without_echo():
    for field in ("hf_token_env", "tracker_key_env"):
        with pytest.raises(ConfigError, match=rf"^config: {field}: expected the NAME") as caught:
            from_dict(WithEnvs, {field: "0f3a9c2e7b1d4f6a8c0e2b4d6f8a1c3e"})
        assert "0f3a9c" not in str(caught.value)
    assert from_dict(WithEnvs, {"hf_token_env": "HF_TOKEN"}).hf_token_env == "HF_TOKEN"
