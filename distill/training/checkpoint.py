"""Atomic, self-validating checkpoints on top of ``accelerate.Accelerator.save_state``.

Layout of an output directory::

    checkpoint-200/            complete checkpoints (accelerate state + trainer_state.json + manifest.json)
    .checkpoint-300.tmp/       a save in progress (or killed half-way): never read
    latest                     text file naming the newest complete checkpoint; moved last

A save writes everything into a hidden temporary directory, writes ``manifest.json`` (every file with its size)
last, fsyncs, and only then renames the directory into place and moves ``latest`` (both with
:mod:`kd_core.atomic`, which fsyncs the parent directory after each rename). A checkpoint whose files do not
match its manifest (truncated by a crash or a full disk) is skipped with a warning naming it, and the previous valid
one is used.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kd_core.atomic import atomic_write_text, publish_directory

logger = logging.getLogger(__name__)

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest"
STUDENT_DIR = "student"  # the student's config.json and tokenizer, for `distill export`


def _write_manifest(directory: Path) -> None:
    files = {
        str(p.relative_to(directory)): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST_FILE
    }
    (directory / MANIFEST_FILE).write_text(json.dumps({"files": files}, indent=1))


def save_checkpoint(
    accelerator,
    output_dir: Path,
    step: int,
    state: dict[str, Any],
    keep: int | None,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Saves on every rank, publishes on the main one. Returns the final directory.

    ``write_extra(tmp_dir)`` runs on the main process before the manifest is written, so its files are validated
    like the rest.
    """
    started = time.perf_counter()
    final = output_dir / f"{PREFIX}{step}"
    tmp = output_dir / f".{PREFIX}{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        if write_extra is not None:
            write_extra(tmp)
        _write_manifest(tmp)
        if final.exists():  # re-saving the same step (e.g. a signal right after a periodic save)
            shutil.rmtree(final)
        # The temporary keeps its known name (not atomic_directory's random one): every rank saves into it, and
        # find_resume_checkpoint reports an unfinished one by that name.
        publish_directory(tmp, final)
        atomic_write_text(output_dir / LATEST_FILE, final.name + "\n")
        if keep:
            for old in list_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # bench/resume.py reads this line
        logger.info("saved %s in %.3f s", final, time.perf_counter() - started)
    return final


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first (temporary ones are never listed)."""
    found = []
    for path in Path(output_dir).glob(f"{PREFIX}*"):
        match = re.fullmatch(rf"{PREFIX}(\d+)", path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def validate(checkpoint: Path) -> str | None:
    """None when the checkpoint matches its manifest, else the reason it cannot be used."""
    manifest_path = checkpoint / MANIFEST_FILE
    if not manifest_path.is_file():
        return "no manifest.json (the save did not complete)"
    try:
        manifest = json.loads(manifest_path.read_text())
        json.loads((checkpoint / STATE_FILE).read_text())
    except (OSError, ValueError) as err:
        return f"unreadable state: {err}"
    for name, size in manifest["files"].items():
        path = checkpoint / name
        if not path.is_file():
            return f"missing file {name}"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, manifest says {size}"
    return None


def find_resume_checkpoint(output_dir: Path) -> Path | None:
    """The newest valid checkpoint; invalid ones (and unfinished temporary saves) are reported and skipped."""
    for tmp in Path(output_dir).glob(f".{PREFIX}*.tmp"):
        logger.warning("ignoring unfinished checkpoint save %s", tmp)
    for checkpoint in reversed(list_checkpoints(output_dir)):
        problem = validate(checkpoint)
        if problem is None:
            return checkpoint
        logger.warning("skipping invalid checkpoint %s: %s", checkpoint, problem)
    return None


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / STATE_FILE).read_text())
