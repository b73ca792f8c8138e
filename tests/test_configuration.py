"""The typed config system: YAML + CLI overrides, type coercion, errors that name the field, resolved saves."""

from __future__ import annotations

import dataclasses
import importlib
import shlex
from typing import Literal

import pytest

from kd_core.config import ConfigError, option, parse_command_line, save_config, section
from kd_recipes.cli import DATA_GEN_COMMANDS, DISTILL_COMMANDS
from tests.conftest import REPO_ROOT


@dataclasses.dataclass
class Inner:
    rank: int = option(8, help="LoRA rank.")
    targets: list[str] = option(["q_proj"], help="Modules.")


@dataclasses.dataclass
class Outer:
    output_dir: str = option("out", help="Where to write.")
    learning_rate: float = option(1e-4, help="LR.")
    bf16: bool = option(False, help="Mixed precision.")
    kind: Literal["a", "b"] = option("a", help="Kind.")
    limit: int | None = option(None, help="Optional limit.")
    weights: dict[str, float] = option({"ce": 1.0}, help="Weights.")
    api_key: str | None = option(None, help="Secret: never saved.")
    inner: Inner = section(Inner, help="Nested.")

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate: expected > 0, got {self.learning_rate}")


def parse(argv):
    return parse_command_line(Outer, argv, "test")


def test_yaml_then_cli_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1e-3\ninner:\n  rank: 4\nweights: {forward_kl: 0.5, ce: 0.5}\n")
    cfg = parse(["--config", str(path), "--inner.rank", "16", "--bf16", "--kind=b", "--limit", "null"])
    assert cfg.learning_rate == pytest.approx(1e-3)  # PyYAML reads "1e-3" as a string; we coerce it
    assert cfg.inner.rank == 16 and cfg.bf16 is True and cfg.kind == "b" and cfg.limit is None
    assert cfg.weights == {"forward_kl": 0.5, "ce": 0.5}
    assert parse(["--inner.targets", "[a, b]", "--weights", "{x: 2}"]).inner.targets == ["a", "b"]


def test_defaults_are_independent():
    a, b = parse([]), parse([])
    a.inner.targets.append("x")
    assert b.inner.targets == ["q_proj"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--learning_rat", "1"], "did you mean '--learning_rate'"),
        (["--inner.rnak", "1"], "did you mean '--inner.rank'"),
        (["--inner.rank", "x"], "inner.rank: expected an integer"),
        (["--inner.rank", "1.5"], "inner.rank: expected an integer"),
        (["--bf16", "maybe"], "bf16: expected true or false"),
        (["--kind", "c"], "kind: expected one of 'a', 'b'"),
        (["--learning_rate", "-1"], "learning_rate: expected > 0"),
        (["--config", "/nonexistent.yaml"], "file not found"),
    ],
)
def test_errors_name_the_field(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse(argv)


def test_unknown_yaml_key_suggests_closest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  rnak: 2\n")
    with pytest.raises(ConfigError, match="unknown config key 'inner.rnak'; did you mean 'inner.rank'"):
        parse(["--config", str(path)])


def test_save_config_roundtrip_without_secrets(tmp_path):
    cfg = parse(["--api_key", "sk-secret", "--inner.rank", "3"])
    saved = save_config(cfg, tmp_path / "config.yaml")
    text = saved.read_text()
    assert "sk-secret" not in text and "api_key" not in text
    again = parse(["--config", str(saved)])
    assert again.inner.rank == 3 and again.api_key is None


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in ("--output_dir", "--learning_rate", "--inner.rank", "--inner.targets", "LoRA rank."):
        assert name in out


def shipped_configs():
    root = REPO_ROOT / "configs"
    return sorted(root.rglob("*.yaml"))


@pytest.mark.parametrize("path", shipped_configs(), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    """Each YAML under configs/ starts with the command line that uses it (e.g. '# distill prune --model DIR
    --output-dir OUT'), and parses, with that command line's other flags, into that command's config class."""
    words = shlex.split(path.read_text().splitlines()[0].lstrip("#"))
    assert words and words[0] in ("distill", "data-gen"), f"{path}: first line must name its command"
    tool, name, args = words[0], words[1], words[2:]
    if "--config" in args:  # the header may show `--config <this file>` itself
        at = args.index("--config")
        del args[at : at + 2]
    commands = DISTILL_COMMANDS if tool == "distill" else DATA_GEN_COMMANDS
    assert name in commands, f"{path}: unknown command {tool} {name}"
    module = importlib.import_module(commands[name][0])
    parse_command_line(module.Config, ["--config", str(path), *args], f"{tool} {name}")
