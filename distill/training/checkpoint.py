"""Atomic, self-validating checkpoints on top of ``accelerate.Accelerator.save_state``.

Layout of an output directory::

    checkpoint-200/            complete checkpoints (accelerate state + trainer_state.json + manifest.json)
    .checkpoint-300.tmp/       a save in progress (or killed half-way): never read
    latest                     text file naming the newest complete checkpoint; moved last

A save writes everything into a hidden temporary directory, writes ``manifest.json`` (every file with its size and
its XXH3-128 content hash, :mod:`kd_core.checksum`) last, fsyncs, and only then renames the directory into place
and moves ``latest`` (both with :mod:`kd_core.atomic`, which fsyncs the parent directory after each rename). A
checkpoint whose files do not match its manifest (truncated by a crash or a full disk: the size; corrupted in place:
the hash) is skipped with a warning naming it and the file, and the previous valid one is used. Manifests of the
earlier version (sizes only) are checked on sizes alone.

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
import struct
import time
import zipfile
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
        return not_a_checkpoint(checkpoint) or "no manifest.json (the save did not complete)"
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
        elif unreadable(path):  # sizes only: at least the file's own structure can tell
            return f"{name} {unreadable(path)} (corrupted; this earlier version's {MANIFEST_FILE} holds sizes only)"
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


# ---------------------------------------------------------------------------------------------------------------------
# What a resume or an export is given: a checkpoint of this run, and readable
# ---------------------------------------------------------------------------------------------------------------------


def not_a_checkpoint(directory: Path) -> str | None:
    """What a directory without a manifest plainly is when it is not a checkpoint (a training run's output
    directory, a model directory), or None (then: a checkpoint whose save did not complete)."""
    directory = Path(directory)
    checkpoints = list_checkpoints(directory)
    if checkpoints or (directory / LATEST_FILE).is_file():
        newest = f"; its newest checkpoint is {checkpoints[-1]}" if checkpoints else ""
        return f"it is a training run's output directory, not a checkpoint{newest}"
    if (directory / "config.json").is_file() and not (directory / STATE_FILE).exists():
        return "it is a model directory, not a checkpoint (a checkpoint-N directory of a training run)"
    return None


def unreadable(path: Path) -> str | None:
    """Why a weights or state file cannot be loaded, from its own structure (for manifests without hashes): a
    safetensors header that does not parse or does not cover the file, a torch zip archive whose CRCs fail."""
    try:
        if path.suffix == ".safetensors":
            with open(path, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                if length > path.stat().st_size - 8:
                    return "has a safetensors header longer than the file"
                header = json.loads(handle.read(length))
            ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
            if max(ends, default=0) != path.stat().st_size - 8 - length:
                return "has a safetensors header that does not match its size"
        elif zipfile.is_zipfile(path):  # torch.save writes zip archives with a CRC per record
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
            if bad is not None:
                return f"fails the CRC check of its record {bad}"
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error, zipfile.BadZipFile) as err:
        return f"cannot be read ({type(err).__name__})"
    return None


def check_identity(checkpoint: Path, tokenizer, settings: dict[str, Any]) -> None:
    """Refuses a checkpoint of another run in one ConfigError: another tokenizer (``student/``, saved with every
    checkpoint), or other ``settings`` (dotted keys of the run's config, compared with the ``config.yaml`` saved in
    the checkpoint). A checkpoint of an earlier version without those files is not compared on them."""
    import yaml

    checkpoint = Path(checkpoint)
    if tokenizer is not None and (checkpoint / STUDENT_DIR / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        theirs = AutoTokenizer.from_pretrained(checkpoint / STUDENT_DIR)
        if _tokenizer_identity(theirs) != _tokenizer_identity(tokenizer):
            raise ConfigError(
                f"resume: checkpoint {checkpoint} was trained with another tokenizer (its "
                f"{STUDENT_DIR}/ holds {len(theirs)} tokens, this run's has {len(tokenizer)}, or other "
                "ids or special tokens); resume a checkpoint of this run"
            )
    saved = checkpoint / "config.yaml"
    if saved.is_file():
        config = yaml.safe_load(saved.read_text()) or {}
        now = json.loads(json.dumps(settings))
        differ = []
        for key, value in now.items():
            old: Any = config
            for part in key.split("."):
                old = old.get(part) if isinstance(old, dict) else None
            if old != value:
                differ.append(f"{key}: checkpoint {old!r} vs now {value!r}")
        if differ:
            raise ConfigError(
                f"resume: checkpoint {checkpoint} belongs to another run ({'; '.join(differ)}); resume "
                "a checkpoint of this run, or start with those settings"
            )


def _tokenizer_identity(tokenizer) -> tuple[str, str]:
    """What makes token ids mean the same: the token -> id map and the special tokens."""
    from distill.data.tokenized import vocab_hash

    special = sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items())
    return vocab_hash(tokenizer), json.dumps(special)


def logged_history(metrics_file: Path, step: int) -> list[dict[str, Any]]:
    """The run's logged training figures from ``metrics.jsonl``, one entry per logged step up to ``step``, across
    every resume and extension (a step logged again after a resume replaces its earlier entry)."""
    by_step: dict[int, dict[str, Any]] = {}
    try:
        lines = Path(metrics_file).read_text().splitlines()
    except OSError:  # a rank that does not see the main process's file
        return []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        if (
            isinstance(record, dict)
            and isinstance(record.get("step"), int)
            and record["step"] <= step
            and any(k.startswith("train/") for k in record)
        ):
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def check_compatible(state: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """A checkpoint's trainer state against the run about to resume from it: the same student config and loss
    terms and weight schedule, else one ConfigError naming what differs (at most five keys)."""
    for key in ("student_config", "loss_terms"):
        if state[key] != current[key]:
            differing = sorted(
                k for k in set(state[key]) | set(current[key]) if state[key].get(k) != current[key].get(k)
            )
            details = ", ".join(
                f"{k}: checkpoint {state[key].get(k)!r} vs now {current[key].get(k)!r}" for k in differing[:5]
            )
            raise ConfigError(f"resume: checkpoint {path} has a different {key.replace('_', ' ')} ({details})")
    schedule = state.get("loss_terms_at_end")  # absent from checkpoints written before the schedule: none
    if schedule != current.get("loss_terms_at_end"):
        raise ConfigError(
            f"resume: checkpoint {path} has a different loss.terms_at_end (checkpoint {schedule!r} vs now "
            f"{current.get('loss_terms_at_end')!r})"
        )


def load_for_resume(
    resume: str | None, output_dir: Path, accelerator, current: dict[str, Any], tokenizer, settings: dict[str, Any]
) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint ``resume`` names (``auto``: the newest valid one in ``output_dir``; else a path), checked
    against ``current`` (the run's trainer state) and the run's identity (``tokenizer``, ``settings``: see
    :func:`check_identity`), and loaded into ``accelerator``'s prepared objects. Returns it
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
    check_identity(found, tokenizer, settings)
    accelerator.load_state(str(found))
    return found, state
