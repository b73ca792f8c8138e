"""``distill precompute``: run the teacher once over a training set and store its top-k log-probabilities.

Run it alone or under ``accelerate launch --num_processes N``: process ``r`` handles training examples ``r, r + N,
...`` and writes one shard; the main process writes ``store.json`` last, after every shard is complete. Train from
the store with ``loss.teacher_store: DIR`` (no ``model.teacher``): see ``docs/offline.md``.

The data settings (and ``seed``, which picks the held-out split) must be the ones training will use: the store
records the dataset's hash and a fingerprint of every tokenized example, and training refuses a mismatch.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from distill.data.datasets import DataSettings, build_datasets, collate
from distill.losses.divergences import shared_vocab_size
from distill.losses.head import OutputHead, as_head, output_head
from distill.losses.kinds import CHUNK_SIZE
from distill.losses.objective import target_positions
from distill.offline import store as ls
from distill.student.models import ModelSettings, load_teacher, load_tokenizer, require_model_dir
from kd_core import checksum, ownership
from kd_core.commands import EXIT_OK
from kd_core.config import ConfigError, option, parse_command_line, save_config, section
from kd_core.pretrained import is_gguf

logger = logging.getLogger("distill")


@dataclasses.dataclass
class PrecomputeConfig:
    teacher: str = option("", help="Teacher model directory (anything AutoModelForCausalLM.from_pretrained loads) or "
                          ".gguf file.")
    output_dir: str = option("", help="New (or empty) directory for the store.")
    k: int = option(64, help="Token ids (and log-probabilities) kept per counted token.")
    temperature: float = option(1.0, help="Softmax temperature of the stored log-probabilities (= loss.temperature).")
    value_bits: int = option(8, help="Bits per stored log-probability (2..16): 8 keeps them within 0.03 nats.")
    value_range: float = option(16.0, help="Log-probabilities below -value_range are stored as -value_range.")
    batch_size: int = option(8, help="Sequences per teacher forward.")
    chunk_size: int = option(CHUNK_SIZE, help="Tokens per chunk when projecting hidden states to logits.")
    teacher_dtype: Literal["float32", "bfloat16", "float16"] = option("float32", help="Teacher weights dtype.")
    attn_implementation: Literal["sdpa", "eager"] = option("sdpa", help="Teacher attention kernel.")
    seed: int = option(42, help="The training seed: it picks the held-out split, so it must match `distill train`.")
    data: DataSettings = section(DataSettings, help="Training data, exactly as `distill train` will read it.")

    def __post_init__(self) -> None:
        if not self.teacher:
            raise ValueError("teacher: a teacher model directory is required")
        if not self.output_dir:
            raise ValueError("output_dir: a directory for the store is required")
        if not self.data.train_file:
            raise ValueError("data.train_file: a training dataset is required")
        if self.k < 1:
            raise ValueError(f"k: expected >= 1, got {self.k}")
        if self.temperature <= 0:
            raise ValueError(f"temperature: expected > 0, got {self.temperature}")
        if not 2 <= self.value_bits <= 16:
            raise ValueError(f"value_bits: expected 2..16, got {self.value_bits}")
        if self.value_range <= 0:
            raise ValueError(f"value_range: expected > 0, got {self.value_range}")
        if self.batch_size < 1 or self.chunk_size < 1:
            raise ValueError("batch_size and chunk_size must be >= 1")


@torch.no_grad()
def teacher_topk(
    hidden: torch.Tensor, head: torch.Tensor | OutputHead, k: int, temperature: float, chunk_size: int,
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
    empty = sum(1 for i in range(len(train_set)) if not train_set[i]["has_completion"])
    if empty:
        raise ConfigError(f"data.train_file: {train_file}: {empty} of {len(train_set)} examples are prompts only (no "
                          "completion); precompute needs prompt/completion, messages ending in an assistant turn, or "
                          "text (prompts-only data trains on-policy, with a live teacher)")


def teacher_identity(teacher: str) -> dict[str, str]:
    """What the store records of its teacher: a model directory's config.json hash, or a GGUF file's own hash (the
    file is the whole model: config, tokenizer and weights)."""
    if is_gguf(teacher):
        return {f"file_{checksum.ALGORITHM}": checksum.file_hash(teacher)}  # at memory speed, even for a 40 GB file
    return {"config_sha256": ls.file_hash(Path(teacher) / "config.json")}


# A store is the whole directory; unmarked, an earlier version's store is recognised by its two files.
OUTPUT = ownership.OutputKind(
    "distill precompute", ("*",),
    legacy=lambda d: (d / "store.json").is_file() and (d / "precompute_config.yaml").is_file(), done="store.json")


def run(cfg: PrecomputeConfig) -> Path:
    """Writes the store into ``cfg.output_dir`` (every process its shard, the main one ``store.json`` last); returns
    the store directory. The main process holds the directory's lock throughout (:mod:`kd_core.ownership`)."""
    require_model_dir(cfg.teacher, "teacher")

    def refuse_a_finished_store(owner: ownership.Owner) -> None:
        # A finished store is never rewritten; an unfinished one (its precompute was killed: no store.json, so
        # nothing trusts its shards) is written again from scratch.
        if owner.finished:
            raise ConfigError(f"output_dir: {cfg.output_dir} holds a finished store; choose a new directory for it")

    # Every rank checks before any rank writes (the main one claims after a barrier), so the check never sees a
    # sibling's fresh shard; only the main one locks, before the process group forms.
    output = ownership.prepare(cfg.output_dir, OUTPUT, {"teacher": str(cfg.teacher), "k": cfg.k}, resume=False,
                               overwrite=True, check=refuse_a_finished_store)
    with output:
        return _write_store(cfg, output)


def _write_store(cfg: PrecomputeConfig, output: ownership.Output) -> Path:
    from accelerate import PartialState

    out = output.path
    # accelerate 1.15 sees one process per rank on a CPU-only machine unless told `cpu` (it then uses gloo); and
    # `accelerate launch --cpu --num_processes N` starts ONE process without an MPI hostfile: launch CPU runs with
    # `--multi_gpu --num_processes N` (torchrun), as docs/offline.md shows.
    state = PartialState(cpu=not torch.cuda.is_available())
    state.wait_for_everyone()
    model_settings = ModelSettings(teacher=cfg.teacher, teacher_dtype=cfg.teacher_dtype,
                                   attn_implementation=cfg.attn_implementation)
    tokenizer = load_tokenizer(model_settings)
    train_set, _ = build_datasets(cfg.data, tokenizer, cfg.seed)
    _require_completions(train_set, cfg.data.train_file)
    teacher = load_teacher(model_settings, bf16=False).to(state.device)
    head = output_head(teacher)  # refuses a family whose head cannot be reproduced, before anything is written
    head_rows = head.weight.shape[0]
    vocab = shared_vocab_size(head_rows, head_rows, len(tokenizer))
    if cfg.k > vocab:
        raise ConfigError(f"k: {cfg.k} is larger than the vocabulary ({vocab} tokens)")
    codec = ls.Codec(vocab, cfg.k, cfg.value_bits, cfg.value_range)
    if state.is_main_process:  # every rank has checked the directory (the barrier above); nothing failed since
        removed = output.claim()  # running: a kill from here on leaves a restartable store
        if removed:
            logger.info("output_dir: %s holds an interrupted precompute (%s); starting again", out, ", ".join(removed))
    state.wait_for_everyone()
    writer = ls.ShardWriter(out, state.process_index, state.num_processes, codec)
    mine = list(range(state.process_index, len(train_set), state.num_processes))
    for start in tqdm(range(0, len(mine), cfg.batch_size), desc="precompute", disable=not state.is_main_process):
        examples = [train_set[i] for i in mine[start : start + cfg.batch_size]]
        batch = collate(examples, tokenizer.pad_token_id)
        hidden = teacher.get_decoder()(
            input_ids=batch["input_ids"].to(state.device), attention_mask=batch["attention_mask"].to(state.device),
            use_cache=False,
        ).last_hidden_state
        positions = target_positions(batch["labels"]).to(state.device)
        ids, values, tails = (t.cpu().numpy() for t in teacher_topk(hidden[positions], head, cfg.k, cfg.temperature,
                                                                    cfg.chunk_size, vocab))
        first = 0
        for example, count in zip(examples, positions.sum(1).tolist()):
            rows = slice(first, first + count)
            writer.add(example["sample_id"], ls.sample_fingerprint(example), ids[rows], values[rows], tails[rows])
            first += count
    from accelerate.utils import gather_object

    # Every rank's shard checksums (computed while writing), to the main process (a collective: all ranks call it).
    written = {d["data"]: d for d in gather_object([writer.close()])}
    state.wait_for_everyone()
    if state.is_main_process:
        shards = []
        for rank in range(state.num_processes):
            data_name, index_name = ls.shard_names(rank, state.num_processes)
            index = np.load(out / index_name)
            tokens = int(index[:, 2].sum())
            shards.append({"data": data_name, "index": index_name, "samples": int(index.shape[0]), "tokens": tokens,
                           "bytes": tokens * codec.record_bytes,
                           **{key: written[data_name][key] for key in (ls.DATA_HASH, ls.INDEX_HASH)}})
        meta = {
            "format": ls.FORMAT,
            "codec": dataclasses.asdict(codec),
            "record_bytes": codec.record_bytes,
            "temperature": cfg.temperature,
            "teacher": {"path": str(cfg.teacher), **teacher_identity(cfg.teacher), "dtype": cfg.teacher_dtype},
            "vocab_sha256": ls.vocab_hash(tokenizer),
            "tokenizer_sha256": ls.tokenizer_hash(tokenizer),
            "dataset": {"file": cfg.data.train_file, "sha256": ls.file_hash(cfg.data.train_file),
                        **dataclasses.asdict(cfg.data), "seed": cfg.seed},
            "samples": sum(s["samples"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
            "shards": shards,
        }
        save_config(cfg, out / "precompute_config.yaml")
        ls.write_meta(out, meta)  # the store is complete (and trusted) from here on
        output.finish()
        logger.info("store %s: %d samples, %d tokens, %d bytes per token", out, meta["samples"], meta["tokens"],
                     codec.record_bytes)
    state.wait_for_everyone()
    return out


Config = PrecomputeConfig


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = parse_command_line(PrecomputeConfig, argv, "distill precompute", __doc__)
    run(cfg)
    return EXIT_OK
