"""Atomic, self-validating checkpoints on top of ``accelerate.Accelerator.save_state``.

Layout of an output directory::

    checkpoint-200/            complete checkpoints (accelerate state + trainer_state.json + manifest.json)
    .checkpoint-300.tmp/       a save in progress (or killed half-way): never read
    latest                     text file naming the newest complete checkpoint; moved last

A save writes everything into a hidden temporary directory, writes ``manifest.json`` (every file with its size and
its XXH3-128 content hash, :mod:`kd_core.checksum`) last, fsyncs, and only then renames the directory into place
and moves ``latest`` (both with :mod:`kd_core.atomic`, which fsyncs the parent directory after each rename). A
checkpoint whose files do not match its manifest (truncated by a crash or a full disk: the size; corrupted in place: the hash) is skipped with a
warning naming it and the file, and the previous valid one is used. Manifests of the earlier version (sizes only) are
checked on sizes alone.

With several processes the hashing is shared: at a save each rank hashes the files it wrote itself (DeepSpeed's
``zero_pp_rank_<r>_*`` shards, ``random_states_<r>.pkl``) while they are in its page cache, the main process gathers
them and hashes the rest (and any file no rank reported); at validation each rank hashes every N-th file and all
ranks agree on the result.
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
from kd_core.checksum import ALGORITHM, file_hash
from kd_core.config import ConfigError

logger = logging.getLogger(__name__)

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest"
STUDENT_DIR = "student"  # the student's config.json and tokenizer, for `distill export`


MANIFEST_VERSION = 2  # 1 (no "version" key): {"files": {name: size}}; 2: {name: {"size": ..., "xxh3_128": ...}}


def _checkpoint_files(directory: Path) -> list[Path]:
    return [p for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST_FILE]


def _writer_rank(name: str) -> int | None:
    """The rank that wrote a file, from its name: DeepSpeed's ``zero_pp_rank_<r>_...``, ``random_states_<r>.pkl``,
    the on-policy sampler's ``on_policy_rank_<r>.pt``."""
    match = re.search(r"(?:pp_rank_|random_states_|on_policy_rank_)(\d+)", name)
    return int(match.group(1)) if match else None


def _hash_entry(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, ALGORITHM: file_hash(path)}


def _hash_own_files(directory: Path, rank: int) -> dict[str, dict[str, Any]]:
    """Entries of the files rank ``rank`` wrote in ``directory`` (hashed while they are in its page cache)."""
    return {
        str(p.relative_to(directory)): _hash_entry(p)
        for p in _checkpoint_files(directory)
        if _writer_rank(str(p.relative_to(directory))) == rank
    }


def _write_manifest(directory: Path, hashed: dict[str, dict[str, Any]] | None = None) -> None:
    """Every file with its size and content hash; ``hashed`` holds entries other ranks computed (reused when the
    size still matches, so a file is read once)."""
    hashed = hashed or {}
    files = {}
    for path in _checkpoint_files(directory):
        name = str(path.relative_to(directory))
        entry = hashed.get(name)
        files[name] = entry if entry is not None and entry["size"] == path.stat().st_size else _hash_entry(path)
    manifest = {"version": MANIFEST_VERSION, "hash": ALGORITHM, "files": files}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))


def _share(accelerator, value: Any) -> list[Any]:
    """``value`` of every rank (a collective: every rank must call it); just ``[value]`` in one process."""
    if accelerator is None or accelerator.num_processes == 1:
        return [value]
    from accelerate.utils import gather_object

    return gather_object([value])


def save_checkpoint(
    accelerator,
    output_dir: Path,
    step: int,
    state: dict[str, Any],
    keep: int | None,
    write_extra: Callable[[Path], None] | None = None,
    write_rank_files: Callable[[Path], None] | None = None,
) -> Path:
    """Saves on every rank, publishes on the main one. Returns the final directory.

    ``write_extra(tmp_dir)`` runs on the main process before the manifest is written, so its files are validated
    like the rest; ``write_rank_files(tmp_dir)`` runs on every rank, for state each rank holds on its own (named so
    that :func:`_writer_rank` knows the rank).
    """
    started = time.perf_counter()
    final = output_dir / f"{PREFIX}{step}"
    tmp = output_dir / f".{PREFIX}{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if write_rank_files is not None:
        write_rank_files(tmp)
    accelerator.wait_for_everyone()
    own = {} if accelerator.is_main_process else _hash_own_files(tmp, accelerator.process_index)
    hashed = {name: entry for part in _share(accelerator, own) for name, entry in part.items()}
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        if write_extra is not None:
            write_extra(tmp)
        _write_manifest(tmp, hashed)
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


def _check_files(checkpoint: Path, rank: int, world: int) -> str | None:
    """Sizes of every file, hashes of this rank's share of them (every ``world``-th file from ``rank``)."""
    manifest_path = checkpoint / MANIFEST_FILE
    if not manifest_path.is_file():
        return "no manifest.json (the save did not complete)"
    try:
        manifest = json.loads(manifest_path.read_text())
        json.loads((checkpoint / STATE_FILE).read_text())
        files = manifest["files"]
        algorithm = manifest.get("hash", ALGORITHM)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"unreadable state: {err!r}"
    if algorithm != ALGORITHM:
        return f"{MANIFEST_FILE} uses hash {algorithm!r}; this version checks {ALGORITHM!r}"
    to_hash = []
    for name, entry in files.items():
        # Version 1 manifests (no "version" key) hold sizes only: nothing to hash, nothing to warn about.
        size, digest = (entry, None) if isinstance(entry, int) else (entry.get("size"), entry.get(ALGORITHM))
        path = checkpoint / name
        if not path.is_file():
            return f"missing file {name}"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, manifest says {size}"
        if digest is None and manifest.get("version", 1) >= 2:
            return f"{name} has no {ALGORITHM} hash in {MANIFEST_FILE}"
        if digest is not None:
            to_hash.append((name, path, digest))
    for name, path, digest in to_hash[rank::world]:  # sizes first (cheap), then the contents
        if file_hash(path) != digest:
            return f"{name} does not match its {ALGORITHM} hash in {MANIFEST_FILE} (corrupted in place; same size)"
    return None


def validate(checkpoint: Path, accelerator=None) -> str | None:
    """None when the checkpoint matches its manifest (sizes, and content hashes where the manifest has them), else
    the reason it cannot be used, naming the file. With ``accelerator`` (several processes) every rank must call it:
    the hashing is split between ranks and they all return the same answer."""
    checkpoint = Path(checkpoint)
    rank, world = (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)
    problems = [p for p in _share(accelerator, _check_files(checkpoint, rank, world)) if p is not None]
    return problems[0] if problems else None


def find_resume_checkpoint(output_dir: Path, accelerator=None) -> Path | None:
    """The newest valid checkpoint; invalid ones (and unfinished temporary saves) are reported and skipped. With
    ``accelerator``, every rank must call it (see :func:`validate`)."""
    main = accelerator is None or accelerator.is_main_process
    for tmp in Path(output_dir).glob(f".{PREFIX}*.tmp"):
        if main:
            logger.warning("ignoring unfinished checkpoint save %s", tmp)
    for checkpoint in reversed(list_checkpoints(output_dir)):
        problem = validate(checkpoint, accelerator)
        if problem is None:
            return checkpoint
        if main:
            logger.warning("skipping invalid checkpoint %s: %s", checkpoint, problem)
    return None


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / STATE_FILE).read_text())


def check_compatible(state: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """A checkpoint's trainer state against the run about to resume from it: the same student config and loss
    terms, else one ConfigError naming what differs (at most five keys)."""
    for key in ("student_config", "loss_terms"):
        if state[key] != current[key]:
            differing = sorted(
                k for k in set(state[key]) | set(current[key]) if state[key].get(k) != current[key].get(k)
            )
            details = ", ".join(f"{k}: checkpoint {state[key].get(k)!r} vs now {current[key].get(k)!r}"
                                for k in differing[:5])
            raise ConfigError(f"resume: checkpoint {path} has a different {key.replace('_', ' ')} ({details})")


def load_for_resume(
    resume: str | None, output_dir: Path, accelerator, current: dict[str, Any]
) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint ``resume`` names (``auto``: the newest valid one in ``output_dir``; else a path), checked
    against ``current`` (the run's trainer state) and loaded into ``accelerator``'s prepared objects. Returns it
    with its trainer state, for the caller to restore the data position; None to start fresh. Every rank calls it."""
    if resume is None:
        return None
    if resume == "auto":
        found = find_resume_checkpoint(output_dir, accelerator)
        if found is None:
            logger.info("no checkpoint in %s: starting fresh", output_dir)
            return None
    else:
        found = Path(resume)
        problem = validate(found, accelerator) if found.is_dir() else "not a directory"
        if problem:
            raise ConfigError(f"resume: cannot use checkpoint {found}: {problem}")
    state = read_state(found)
    check_compatible(state, current, found)
    accelerator.load_state(str(found))
    return found, state
