"""Every `distill` / `data-gen` command shown in the README names a real subcommand and parses into its config.

Running them is the job of each feature's own tests (the quickstart, training, pruning, generation and dedup tests
run these very commands on tiny inputs); this test catches a README that drifts from the code: a renamed flag, a
removed subcommand, a value of the wrong type.
"""

from __future__ import annotations

import importlib
import re
import shlex

import pytest

from kd_core.config import parse_command_line
from kd_recipes.cli import DATA_GEN_COMMANDS, DISTILL_COMMANDS
from tests.conftest import REPO_ROOT

README = REPO_ROOT / "README.md"


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split(" # ")[0].strip()
            for part in line.split("&&"):
                part = part.strip()
                if re.match(r"^(accelerate launch .*-m )?(distill|data-gen) ", part) or part in ("distill quickstart",):
                    commands.append(part)
    return commands


def test_readme_shows_commands():
    assert len(readme_commands()) >= 5


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_parses(command):
    words = [w for w in shlex.split(command) if w != "..."]
    if words[0] == "accelerate":
        words = words[words.index("-m") + 1 :]
    tool, name, args = words[0], words[1], words[2:]
    commands = DISTILL_COMMANDS if tool == "distill" else DATA_GEN_COMMANDS
    assert name in commands, f"README names unknown command: {tool} {name}"
    module = importlib.import_module(commands[name][0])
    # Paths need not exist for parsing; the README's placeholders (T, DIR, ...) stay as they are.
    parse_command_line(module.Config, args, f"{tool} {name}")
