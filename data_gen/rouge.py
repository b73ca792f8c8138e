"""Exact, fast ROUGE-L novelty filter (the Self-Instruct "keep an instruction only if it is new" step).

Self-Instruct keeps a generated instruction only when its ROUGE-L F against every instruction already in the pool
is at most a threshold. Scanning the pool with ``rouge_score`` costs one Python dynamic program per pair, so a 52K
pool takes about a day of CPU. :class:`NoveltyIndex` gives the same decisions and the same scores, exactly, by
scoring only the kept texts that could possibly matter:

* ROUGE-L F is ``2 * L / (m + n)`` where ``L`` is the longest common subsequence of the two token lists (lengths
  ``m``, ``n``). A common subsequence uses each shared token at most as often as it occurs in both texts, so
  ``L <= O``, the multiset token overlap; therefore F <= ``2 * O / (m + n)`` (a ROUGE-1 F). This is a true upper
  bound, never an estimate.
* Overlaps come from an inverted index whose keys are token *occurrences* ("the", "the#1", "the#2", ... for the
  first, second, third "the"): concatenating the posting lists of a candidate's keys and counting ids with
  ``numpy.bincount`` gives, in C, the exact multiset overlap with every kept text at once. Kept texts sharing no
  token score 0 and are never looked at.
* ``O <= min(m, n)``, so the bound also contains the length-ratio bound ``2 * min(m, n) / (m + n)``.
* Only texts whose bound can exceed what we need (the threshold for ``is_novel``, the best score found so far for
  ``most_similar``) get an exact LCS, best bound first, stopping as soon as the next bound is too low.
* The LCS is the bit-parallel algorithm of Allison & Dix (1986) / Hyyrö (2004) on Python integers: one word-sized
  step per token of the candidate instead of a table of ``m * n`` cells.

Scores are computed with the same float operations, in the same order, as ``rouge_score`` 0.1.2
(``rouge_scorer._score_lcs`` and ``scoring.fmeasure``), so they are identical floats, not merely close ones. Bounds
are compared with a margin of ``_EPS`` so that float rounding in a bound can never prune a text that should have
been scored.

Decision rule (used everywhere in this project): a text is novel iff its ROUGE-L F against every kept text is
``<= threshold``; ``most_similar`` breaks ties by the lowest index, as ``numpy.argmax`` over a scan does.
"""

from __future__ import annotations

import re

import numpy as np

# rouge_score 0.1.2 tokenize.tokenize (no stemmer): lowercase, replace every run of characters outside [a-z0-9] by a
# space, split on whitespace, drop empty tokens. The surviving tokens are exactly the maximal [a-z0-9] runs of the
# lowercased text, which findall returns directly. Lowercasing must come first: str.lower() maps some non-ASCII
# characters to ASCII (the Kelvin sign to "k"), as in rouge_score.
_TOKEN_RE = re.compile(r"[a-z0-9]+")

# Margin for comparing float upper bounds with scores: bounds and scores are each a few roundings away from their
# exact rational values (errors around 1e-16), so a margin of 1e-9 keeps every pruning decision conservative.
_EPS = 1e-9


def rouge_tokens(text: str) -> list[str]:
    """Exactly rouge_score's default tokenization (``RougeScorer(['rougeL'], use_stemmer=False)``)."""
    return _TOKEN_RE.findall(text.lower())


def _fmeasure(lcs: int, target_len: int, prediction_len: int) -> float:
    """rouge_score's F from an LCS length, with its exact float operations (``_score_lcs`` + ``scoring.fmeasure``).

    Swapping target and prediction gives the same float: ``(2 * p) * r`` and ``(2 * r) * p`` are both exactly twice
    the (commutative) rounded product, and ``p + r`` is commutative.
    """
    if not target_len or not prediction_len:
        return 0.0
    precision = lcs / prediction_len
    recall = lcs / target_len
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


def _match_masks(tokens: list[str]) -> dict[str, int]:
    """For each distinct token, an integer whose bit ``i`` is set where ``tokens[i]`` is that token."""
    masks: dict[str, int] = {}
    for i, token in enumerate(tokens):
        masks[token] = masks.get(token, 0) | (1 << i)
    return masks


def _lcs_length(masks: dict[str, int], length: int, other: list[str]) -> int:
    """Length of the LCS of the text described by ``masks`` (``length`` tokens) and ``other`` (bit-parallel).

    ``v`` has a zero bit for every position of the first text matched so far; each token of ``other`` moves the
    zeros with one addition (Hyyrö 2004, "Bit-parallel LCS-length computation revisited"). Tokens absent from the
    first text leave ``v`` unchanged, so they are skipped. Carries out of the top bit only create bits above
    ``length``, which never meet a match mask, so ``v`` is masked once at the end rather than at every step.
    """
    v = (1 << length) - 1
    for match in map(masks.get, other):
        if match:
            u = v & match
            v = (v + u) | (v - u)
    return length - (v & ((1 << length) - 1)).bit_count()


def rouge_l_f(a_tokens: list[str], b_tokens: list[str]) -> float:
    """Identical float to rouge_score's rougeL fmeasure with target ``a_tokens`` and prediction ``b_tokens``.

    The score is symmetric (see :func:`_fmeasure`); an empty side scores 0.0 as in rouge_score.
    """
    if not a_tokens or not b_tokens:
        return 0.0
    lcs = _lcs_length(_match_masks(a_tokens), len(a_tokens), b_tokens)
    return _fmeasure(lcs, len(a_tokens), len(b_tokens))


def _occurrence_keys(tokens: list[str]) -> list[str]:
    """One key per token occurrence: "x" for the first x, "x#1" for the second, ... ('#' is never in a token)."""
    seen: dict[str, int] = {}
    keys = []
    for token in tokens:
        k = seen.get(token, 0)
        seen[token] = k + 1
        keys.append(token if k == 0 else f"{token}#{k}")
    return keys


class _Postings:
    """A growable int32 array of kept-text ids (amortised O(1) append, a zero-copy view for numpy)."""

    __slots__ = ("ids", "size")

    def __init__(self) -> None:
        self.ids = np.empty(4, dtype=np.int32)
        self.size = 0

    def append(self, index: int) -> None:
        if self.size == len(self.ids):
            self.ids = np.concatenate([self.ids, np.empty(len(self.ids), dtype=np.int32)])
        self.ids[self.size] = index
        self.size += 1

    def view(self) -> np.ndarray:
        return self.ids[: self.size]


class NoveltyIndex:
    """Kept texts with an inverted index over token occurrences; exact ROUGE-L F queries against all of them."""

    def __init__(self, threshold: float = 0.7) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold: expected a number in [0, 1], got {threshold!r}")
        self.threshold = threshold
        self._tokens: list[list[str]] = []
        self._masks: list[dict[str, int]] = []
        self._lengths = _Postings()  # token count of each kept text, as an array for vectorised bounds
        self._postings: dict[str, _Postings] = {}  # occurrence key -> ids of the kept texts that have it

    def __len__(self) -> int:
        return len(self._tokens)

    def tokens(self, index: int) -> list[str]:
        """The rouge tokens of kept text ``index``."""
        return self._tokens[index]

    def add(self, text: str) -> int:
        """Adds ``text`` unconditionally and returns its index."""
        tokens = rouge_tokens(text)
        index = len(self._tokens)
        self._tokens.append(tokens)
        self._masks.append(_match_masks(tokens))
        self._lengths.append(len(tokens))
        for key in _occurrence_keys(tokens):
            postings = self._postings.get(key)
            if postings is None:
                postings = self._postings[key] = _Postings()
            postings.append(index)
        return index

    def most_similar(self, text: str) -> tuple[int | None, float]:
        """(index of the kept text with the highest ROUGE-L F, that score); (None, 0.0) on an empty index.

        Exact: the same answer as scoring every kept text with rouge_score; ties go to the lowest index, so a text
        that shares no token with any kept text gets (0, 0.0).
        """
        if not self._tokens:
            return None, 0.0
        best, score = self._search(rouge_tokens(text), floor=0.0, first=False)
        return (0, 0.0) if best is None else (best, score)

    def is_novel(self, text: str) -> bool:
        """True iff the max ROUGE-L F against all kept texts is <= threshold (stops at the first text above it)."""
        best, _ = self._search(rouge_tokens(text), floor=self.threshold, first=True)
        return best is None

    def add_if_novel(self, text: str) -> tuple[bool, int | None, float]:
        """(kept, most similar index, score). Greedy: adds ``text`` iff its score <= threshold."""
        index, score = self.most_similar(text)
        kept = score <= self.threshold
        if kept:
            self.add(text)
        return kept, index, score

    def _search(self, tokens: list[str], floor: float, first: bool) -> tuple[int | None, float]:
        """The kept text with the highest F above ``floor`` (lowest index on ties), or (None, floor) if none.

        With ``first`` it returns as soon as any text scores above ``floor`` (enough to decide novelty); otherwise
        the floor rises to the best score found, pruning every text whose bound cannot reach it.
        """
        m = len(tokens)
        if m == 0 or not self._tokens:
            return None, floor
        lists = [p.view() for p in map(self._postings.get, _occurrence_keys(tokens)) if p is not None]
        if not lists:
            return None, floor
        # Exact multiset overlap with every kept text that shares a token (the others score 0).
        overlap = np.bincount(np.concatenate(lists))
        ids = np.flatnonzero(overlap)
        lengths = self._lengths.view()[ids]
        # ROUGE-1-style bound 2*O/(m+n); O <= min(m, n) already, so it includes the length-ratio bound.
        bound = 2.0 * overlap[ids] / (m + lengths)
        best_id: int | None = None
        best = floor
        scored: set[int] = set()

        def consider(kid: int) -> bool:
            """Scores ``kid`` and keeps it if it beats the best (or ties it with a lower index); True if kept."""
            nonlocal best_id, best
            scored.add(kid)
            score = self._score(kid, tokens)
            if score > best or (best_id is not None and score == best and kid < best_id):
                best_id, best = kid, score
                return True
            return False

        keep = bound >= best - _EPS
        ids, bound = ids[keep], bound[keep]
        if not first and len(ids) > 16:
            # Score the few most promising texts first so that the best score rises before sorting the rest.
            for kid in np.sort(ids[np.argpartition(-bound, 8)[:8]]).tolist():
                consider(kid)
            keep = bound >= best - _EPS
            ids, bound = ids[keep], bound[keep]
        # Best bound first; a stable sort keeps ids ascending among equal bounds.
        order = np.argsort(-bound, kind="stable")
        for kid, kid_bound in zip(ids[order].tolist(), bound[order].tolist()):
            if kid_bound < best - _EPS:
                break  # sorted: no later text can reach the best score either
            if kid not in scored and consider(kid) and first:
                return best_id, best
        return best_id, best

    def _score(self, kid: int, tokens: list[str]) -> float:
        """Exact ROUGE-L F between kept text ``kid`` and ``tokens`` (bit-parallel over the kept text's masks)."""
        kept = self._tokens[kid]
        lcs = _lcs_length(self._masks[kid], len(kept), tokens)
        return _fmeasure(lcs, len(kept), len(tokens))
