"""``distill precompute``: run the teacher once over a training set and store its top-k log-probabilities.

Run it alone or under ``accelerate launch --num_processes N``: the training set is cut into segments of
``segment_samples`` examples, dealt round-robin to the processes; each segment is committed on its own (see
:mod:`distill.offline.segments`), and the main process writes ``store.json`` last, once every segment is. A run
killed part-way (``kill -9``, preemption) is resumed by running the same command again: committed segments are
kept and only the rest is computed, with any number of processes. Train from the store with
``loss.teacher_store: DIR`` (no ``model.teacher``): see ``docs/offline.md``.

The data settings (and ``seed``, which picks the held-out split) must be the ones training will use: the store
records the dataset's hash and a fingerprint of every tokenized example, and training refuses a mismatch.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.data.cross import check_pair
from distill.data.datasets import build_datasets, collate
from distill.data.tokenized import tokenizer_hash, vocab_hash
from distill.losses.divergences import shared_vocab_size
from distill.losses.head import OutputHead, as_head, output_head
from distill.losses.objective import target_positions
from distill.offline import segments, served
from distill.offline import store as ls
from distill.offline.precompute_config import PrecomputeConfig
from distill.student.models import DTYPES, ModelSettings, load_teacher, load_tokenizer, require_model_dir
from kd_core import checksum, ownership
from kd_core.commands import EXIT_OK, Stopped, stop_code
from kd_core.config import ConfigError, parse_command_line, save_config
from kd_core.pretrained import is_gguf, load_causal_lm
from kd_core.pretrained import load_tokenizer as load_pretrained_tokenizer

logger = logging.getLogger("distill")


@torch.no_grad()
def teacher_topk(
    hidden: torch.Tensor,
    head: torch.Tensor | OutputHead,
    k: int,
    temperature: float,
    chunk_size: int,
    vocab: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k ids ``[N, k]``, their log-probabilities ``[N, k]`` and the log tail mass ``[N]`` (fp32), chunk by chunk,
    from the teacher's own head (bias, scale, soft-cap: :mod:`distill.losses.head`) cropped to ``vocab`` rows."""
    head = as_head(head)
    ids, values, tails = [], [], []
    for start in range(0, hidden.shape[0], chunk_size):
        logp = torch.log_softmax(head.logits(hidden[start : start + chunk_size], vocab) / temperature, dim=-1)
        top, top_ids = logp.topk(k, dim=-1)
        # Tail from the remaining log-probabilities, not log(1 - sum): exact even when the top k hold ~all mass.
        tails.append(torch.logsumexp(logp.scatter(1, top_ids, float("-inf")), dim=-1))
        ids.append(top_ids)
        values.append(top)
    return torch.cat(ids), torch.cat(values), torch.cat(tails)


def _require_completions(train_set, train_file: str) -> None:
    """The store holds the teacher's distributions over completion tokens: prompts-only rows (on-policy data) have
    none, so a dataset of them is refused before the teacher loads or anything is written."""
    # A column read of the memory-mapped set (build_datasets' ArrowExamples), not a Python pass over every row.
    empty = int((~train_set.column("has_completion")).sum())
    if empty:
        raise ConfigError(
            f"data.train_file: {train_file}: {empty} of {len(train_set)} examples are prompts only (no "
            "completion); precompute needs prompt/completion, messages ending in an assistant turn, or "
            "text (prompts-only data trains on-policy, with a live teacher)"
        )


def teacher_identity(teacher: str) -> dict[str, str]:
    """What the store records of its teacher: a model directory's config.json hash, or a GGUF file's own hash (the
    file is the whole model: config, tokenizer and weights)."""
    if is_gguf(teacher):
        return {f"file_{checksum.ALGORITHM}": checksum.file_hash(teacher)}  # at memory speed, even for a 40 GB file
    return {"config_sha256": ls.file_hash(Path(teacher) / "config.json")}


# A store is the whole directory; unmarked, an earlier version's store is recognised by its two files.
OUTPUT = ownership.OutputKind(
    "distill precompute",
    ("*",),
    legacy=lambda d: (d / "store.json").is_file() and (d / "precompute_config.yaml").is_file(),
    done="store.json",
)


def teacher_dtype(cfg: PrecomputeConfig) -> str:
    """The dtype the teacher loads in: ``auto`` is bfloat16 where CUDA runs bf16 matmuls natively, float32 on a CPU
    (the same on every rank of a launch: one kind of machine)."""
    if cfg.teacher_dtype != "auto":
        return cfg.teacher_dtype
    return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"


def store_settings(cfg: PrecomputeConfig) -> dict[str, Any]:
    """What a resumed run must share with the run that committed the segments, recorded in the directory's marker:
    everything that changes a stored byte. Not the process count (segments do not depend on it), nor where the
    teacher's layers sit (``teacher_device_map``: a teacher that did not fit may be sharded on the rerun)."""
    # How a served teacher is reached and paid (limits, budget, key) changes no byte either; its URL is recorded as
    # host/model only, since the settings are saved in the directory's marker and may hold no credential.
    placement = ("output_dir", "overwrite", "teacher_device_map", "teacher_max_memory", "teacher_offload_dir")
    placement += ("served", "teacher_api_key_env", "teacher_url")
    settings = {key: value for key, value in dataclasses.asdict(cfg).items() if key not in placement}
    settings["dataset_sha256"] = ls.file_hash(cfg.data.train_file)
    if cfg.teacher_url:
        settings["teacher_identity"] = {"served": served.served_identity(cfg.teacher_url, cfg.teacher_model)}
    else:
        settings.update(teacher_dtype=teacher_dtype(cfg), teacher_identity=teacher_identity(cfg.teacher))
    return settings


def teacher_record(cfg: PrecomputeConfig) -> dict[str, Any]:
    """The store's ``teacher`` entry: a local teacher's path, identity and dtype, or a served one's host/model."""
    if cfg.teacher_url:
        return {"path": served.served_identity(cfg.teacher_url, cfg.teacher_model), "served": cfg.teacher_model}
    return {"path": str(cfg.teacher), **teacher_identity(cfg.teacher), "dtype": teacher_dtype(cfg)}


def run_tokenizer(cfg: PrecomputeConfig):
    """The tokenizer the rows are tokenized with: the local teacher's, or (served teacher) the student's."""
    if not cfg.teacher_url:
        return load_tokenizer(ModelSettings(teacher=cfg.teacher))
    tokenizer = load_pretrained_tokenizer(cfg.student_tokenizer, "student_tokenizer")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # as distill.student.models.load_tokenizer: collation needs an id
    return tokenizer


def run(cfg: PrecomputeConfig) -> Path:
    """Writes the store into ``cfg.output_dir`` (every process its segments, the main one ``store.json`` last);
    returns the store directory. The main process holds the directory's lock throughout (:mod:`kd_core.ownership`).
    """
    if cfg.teacher_url:
        # One process drives a served teacher (its calls run concurrently); several would score every row twice.
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("teacher_url: run a served teacher's precompute as one process (no accelerate launch)")
        served.probe(cfg, run_tokenizer(cfg))  # before anything is written: reachable, same tokenizer, k answered
    else:
        require_model_dir(cfg.teacher, "teacher")
    if cfg.teacher_device_map and is_gguf(cfg.teacher):
        raise ConfigError(
            "teacher_device_map: a .gguf teacher is dequantized on one device; save it as a model "
            "directory (save_pretrained) to shard it"
        )
    if cfg.teacher_device_map and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            "teacher_device_map: each process shards the teacher over all of its machine's devices; "
            "launch one process per machine (--num_processes = number of machines)"
        )

    def refuse_a_finished_store(owner: ownership.Owner) -> None:
        # A finished store is never rewritten; an unfinished one resumes (same settings) or, with --overwrite,
        # starts again.
        if owner.finished:
            raise ConfigError(f"output_dir: {cfg.output_dir} holds a finished store; choose a new directory for it")

    # Every rank checks before any rank writes (the main one claims after a barrier), so the check never sees a
    # sibling's fresh segment; only the main one locks, before the process group forms.
    output = ownership.prepare(
        cfg.output_dir,
        OUTPUT,
        store_settings(cfg),
        resume=True,
        overwrite=cfg.overwrite,
        check=refuse_a_finished_store,
        remedy="pass --overwrite to start again (its segments are removed) or choose a new directory",
        defaults=ownership.defaults_of(PrecomputeConfig),
    )
    with output:
        return _write_store(cfg, output)


def _load_teacher(cfg: PrecomputeConfig, device: torch.device) -> PreTrainedModel:
    """The teacher on this process's device, or sharded over its devices by ``teacher_device_map``."""
    settings = ModelSettings(
        teacher=cfg.teacher, teacher_dtype=teacher_dtype(cfg), attn_implementation=cfg.attn_implementation
    )
    if not cfg.teacher_device_map:
        return load_teacher(settings, bf16=False).to(device)
    # Integer keys are GPU indices; YAML and the command line give every key as a string.
    memory = {int(key) if str(key).isdigit() else key: value for key, value in cfg.teacher_max_memory.items()}
    teacher = load_causal_lm(
        cfg.teacher,
        "teacher",
        DTYPES[settings.teacher_dtype],
        attn_implementation=cfg.attn_implementation,
        device_map=cfg.teacher_device_map,
        max_memory=memory or None,
        offload_folder=cfg.teacher_offload_dir or None,
    )
    return teacher.eval().requires_grad_(False)


def _write_store(cfg: PrecomputeConfig, output: ownership.Output) -> Path:
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    out = output.path
    # accelerate 1.15 sees one process per rank on a CPU-only machine unless told `cpu` (it then uses gloo); and
    # `accelerate launch --cpu --num_processes N` starts ONE process without an MPI hostfile: launch CPU runs with
    # `--multi_gpu --num_processes N` (torchrun), as docs/offline.md shows.
    state = PartialState(cpu=not torch.cuda.is_available())
    state.wait_for_everyone()
    if cfg.teacher_url:
        tokenizer, student = run_tokenizer(cfg), None
    else:
        tokenizer = load_tokenizer(ModelSettings(teacher=cfg.teacher))
        student = student_tokenizer(cfg, tokenizer)
    train_set, _ = build_datasets(cfg.data, student or tokenizer, cfg.seed, tokenizer if student else None)
    _require_completions(train_set, cfg.data.train_file)
    if cfg.teacher_url:
        teacher, vocab = None, len(tokenizer)  # the server's ids are checked against it row by row
    else:
        teacher = _load_teacher(cfg, state.device)
        head = output_head(teacher)  # refuses a family whose head cannot be reproduced, before anything is written
        head_rows = head.weight.shape[0]
        vocab = shared_vocab_size(head_rows, head_rows, len(tokenizer))
    if cfg.k > vocab:
        raise ConfigError(f"k: {cfg.k} is larger than the vocabulary ({vocab} tokens)")
    codec = ls.Codec(vocab, cfg.k, cfg.value_bits, cfg.value_range)
    all_spans = segments.spans(len(train_set), cfg.segment_samples)
    # The main process decides what is left (and removes uncommitted pieces) before any process writes; the others
    # receive its list: one broadcast on every rank.
    todo: list[list[int] | None] = [None]
    if state.is_main_process:  # every rank has checked the directory (the barrier above); nothing failed since
        todo[0] = _claim(cfg, output, train_set, all_spans, codec)
    broadcast_object_list(todo, from_process=0)
    mine = todo[0][state.process_index :: state.num_processes]
    if cfg.teacher_url:
        served.write_segments(cfg, out, train_set, all_spans, mine, codec)
    else:
        for number in tqdm(mine, desc="precompute segments", disable=not state.is_main_process):
            span = all_spans[number]
            targets = _span_targets(cfg, teacher, student or tokenizer, train_set, span, vocab)
            segments.write(out, number, span, codec, targets)
    state.wait_for_everyone()  # every segment is committed
    if state.is_main_process:
        shards = [segments.read_record(out, n) for n in range(len(all_spans))]
        _finish(cfg, output, tokenizer, codec, shards, student)
    state.wait_for_everyone()
    return out


def _claim(
    cfg: PrecomputeConfig, output: ownership.Output, train_set, all_spans: list[range], codec: ls.Codec
) -> list[int]:
    """Main process: takes the directory (removing the previous output if --overwrite replaces it) and returns the
    segments still to compute."""
    removed = output.claim()  # running: a kill from here on leaves a resumable store
    if removed:
        logger.info(
            "output_dir: %s holds an unfinished precompute with other settings; --overwrite: starting again",
            output.path,
        )

    def expected(span: range) -> np.ndarray:
        rows = [(e["sample_id"], ls.sample_fingerprint(e)) for e in (train_set[i] for i in span)]
        return np.asarray(rows, dtype=np.int64).reshape(-1, 2)

    todo = segments.pending(output.path, all_spans, codec, expected)
    if output.resumed:
        logger.info(
            "output_dir: %s holds an interrupted precompute; keeping %d of %d committed segments, computing %d",
            output.path,
            len(all_spans) - len(todo),
            len(all_spans),
            len(todo),
        )
    return todo


def _span_targets(
    cfg: PrecomputeConfig, teacher: PreTrainedModel, tokenizer, train_set, span: range, vocab: int
) -> Iterator[segments.Sample]:
    """The teacher's top-k targets of the span's examples, one sample at a time, computed batch by batch: at the
    counted positions, or across tokenizers at the teacher's positions aligned with them (its own tokens)."""
    from accelerate.utils import align_module_device

    lm_head = teacher.get_output_embeddings()
    for start in range(span.start, span.stop, cfg.batch_size):
        examples = [train_set[i] for i in range(start, min(start + cfg.batch_size, span.stop))]
        batch = collate(examples, tokenizer.pad_token_id)
        device = teacher.get_input_embeddings().weight.device  # a device map's first device
        prefix = "teacher_" if "cross_pairs" in batch else ""  # across tokenizers: the teacher's own tokens
        hidden = teacher.get_decoder()(
            input_ids=batch[f"{prefix}input_ids"].to(device),
            attention_mask=batch[f"{prefix}attention_mask"].to(device),
            use_cache=False,
        ).last_hidden_state
        # Offloaded by a device map (weights on the meta device), the head is brought in for the batch.
        with align_module_device(lm_head):
            head = output_head(teacher)  # the model's own head (bias, scale, soft-cap), brought in
            hidden = hidden.to(head.weight.device)
            selected, counts = _stored_rows(batch, hidden)
            ids, values, tails = (
                t.cpu().numpy() for t in teacher_topk(selected, head, cfg.k, cfg.temperature, cfg.chunk_size, vocab)
            )
        first = 0
        for example, count in zip(examples, counts):
            rows = slice(first, first + count)
            yield example["sample_id"], ls.sample_fingerprint(example), ids[rows], values[rows], tails[rows]
            first += count


def _stored_rows(batch: dict[str, torch.Tensor], hidden: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The teacher's hidden states whose top-k is stored, in the store's order (row-major), and how many per row:
    at the counted positions, or at the teacher positions of the aligned pairs (in the student's order)."""
    if "cross_pairs" in batch:
        rows, _, teacher_positions = batch["cross_pairs"].to(hidden.device).unbind(1)
        return hidden[rows, teacher_positions], torch.bincount(rows, minlength=hidden.shape[0]).tolist()
    positions = target_positions(batch["labels"]).to(hidden.device)
    return hidden[positions], positions.sum(1).tolist()


def student_tokenizer(cfg: PrecomputeConfig, teacher_tokenizer) -> PreTrainedTokenizerBase | None:
    """Across tokenizers, the student's tokenizer, checked with the teacher's as ``distill train`` checks them
    (offsets, chat templates); None for a store in the teacher's tokenizer."""
    if not cfg.student_tokenizer:
        return None
    student = load_pretrained_tokenizer(cfg.student_tokenizer, "student_tokenizer")
    check_pair(student, teacher_tokenizer, ("student_tokenizer", "teacher"), cfg.data.format)
    if student.pad_token_id is None:
        student.pad_token = student.eos_token  # the collator needs an id; padded positions are masked anyway
    return student


def _finish(
    cfg: PrecomputeConfig,
    output: ownership.Output,
    tokenizer,
    codec: ls.Codec,
    shards: list[dict[str, Any]],
    student: PreTrainedTokenizerBase | None = None,
) -> None:
    """Main process, once every segment is committed: ``store.json`` (the store is trusted from then on)."""
    out = output.path
    meta = {
        "format": ls.FORMAT,
        "codec": dataclasses.asdict(codec),
        "record_bytes": codec.record_bytes,
        "temperature": cfg.temperature,
        "teacher": teacher_record(cfg),
        "vocab_sha256": vocab_hash(tokenizer),
        "tokenizer_sha256": tokenizer_hash(tokenizer),
        "dataset": {
            "file": cfg.data.train_file,
            "sha256": ls.file_hash(cfg.data.train_file),
            **dataclasses.asdict(cfg.data),
            "seed": cfg.seed,
        },
        "samples": sum(s["samples"] for s in shards),
        "tokens": sum(s["tokens"] for s in shards),
        "shards": shards,
    }
    if student is not None:  # across tokenizers: the student the positions were aligned for, and the teacher's
        meta[ls.STUDENT_KEY] = {
            "path": cfg.student_tokenizer,
            "vocab_sha256": vocab_hash(student),
            "tokenizer_sha256": tokenizer_hash(student),
        }
        tokenizer.save_pretrained(out / ls.TEACHER_TOKENIZER_DIR)  # training reads it from the store
    save_config(cfg, out / "precompute_config.yaml")
    ls.write_meta(out, meta)  # the store is complete (and trusted) from here on
    output.finish()
    logger.info(
        "store %s: %d samples, %d tokens, %d bytes per token", out, meta["samples"], meta["tokens"], codec.record_bytes
    )


Config = PrecomputeConfig


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = parse_command_line(PrecomputeConfig, argv, "distill precompute", __doc__)
    try:
        run(cfg)
    except Stopped as stop:  # a served teacher's budget or server stopped the run: resumable, nothing lost
        print(stop.message, file=sys.stderr, flush=True)
        return stop_code(stop.reason)
    return EXIT_OK
