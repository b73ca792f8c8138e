"""Processes of one `accelerate launch` open the same new answer cache at the same moment."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path


def _open(path: Path, barrier, results) -> None:
    from data_gen.cache import AnswerCache

    barrier.wait()
    try:
        cache = AnswerCache(path)
        cache.put("k", "text", "stop", 1, 1)
        results.put("ok")
    except Exception as err:  # reported to the parent, which asserts on it
        results.put(repr(err))


def test_simultaneous_opens_of_a_new_cache_all_succeed(tmp_path):
    """Without a retry, switching a fresh database to WAL failed with 'database is locked' in most pairs."""
    context = mp.get_context("fork")
    for trial in range(20):
        path = tmp_path / f"t{trial}" / "cache.sqlite"
        barrier, results = context.Barrier(2), context.Queue()
        processes = [context.Process(target=_open, args=(path, barrier, results)) for _ in range(2)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout=60)
        assert [results.get(timeout=5), results.get(timeout=5)] == ["ok", "ok"], trial
