"""Duplicate removal as pure numpy functions: exact (content hash) and near-duplicate (MinHash + LSH bands).

Both run distributed in `prepare`: documents are hash-partitioned so equal documents meet in one
partition (exact), and LSH band keys are partitioned so candidate pairs meet in one task
(near-duplicate). Each task keeps the document with the smallest input position, so the result
is the same however the corpus was split into tasks.

MinHash works on the token ids the read tasks already have (shingles of `ngram` tokens), hashed
with a multiply-shift family vectorised over a whole batch; datasketch's `MinHash` would hash each
shingle in Python per document and its `MinHashLSH` is a single-process index, so bigray keeps
the same maths (and datasketch's choice of bands and rows) in numpy.
"""

from __future__ import annotations

import functools

import numpy as np

from bigray.data.pack import splitmix64

_SHINGLE_MULT = np.uint64(0x100000001B3)
_CHUNK_SHINGLES = 1 << 16


def first_occurrence(hashes: np.ndarray) -> np.ndarray:
    """Mask of the documents kept by exact dedup: `hashes` are in input order, the first of each kept."""
    keep = np.zeros(len(hashes), dtype=bool)
    keep[np.unique(hashes, return_index=True)[1]] = True
    return keep


@functools.lru_cache(maxsize=16)
def lsh_params(threshold: float, permutations: int, false_positive_weight: float = 0.1) -> tuple[int, int]:
    """(bands, rows per band) minimising weighted false positives + false negatives around `threshold`.

    datasketch's rule. Its default weighs both alike, which finds only ~40% of pairs at the threshold;
    bigray verifies every candidate pair on its signatures, so it can weigh missed pairs 9:1.
    """
    xs = np.linspace(0.0, 1.0, 1001)

    def area(b: int, r: int, lo: float, hi: float, fp: bool) -> float:
        x = xs[(xs >= lo) & (xs <= hi)]
        p = 1 - (1 - x**r) ** b
        return float(np.trapezoid(p if fp else 1 - p, x))

    w = false_positive_weight
    best = min(
        ((w * area(b, r, 0, threshold, True) + (1 - w) * area(b, r, threshold, 1, False), b, r)
         for b in range(1, permutations + 1) for r in range(1, permutations // b + 1)),
    )
    return best[1], best[2]


def estimate_jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Jaccard similarity per row from 8-bit MinHash signatures (b-bit MinHash: random matches happen 1/256)."""
    matches = (a == b).mean(axis=-1)
    return (matches - 1 / 256) / (1 - 1 / 256)


def _family(permutations: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    a = splitmix64(np.arange(permutations, dtype=np.uint64) + np.uint64(seed)) | np.uint64(1)
    b = splitmix64(np.arange(permutations, dtype=np.uint64) + np.uint64(seed + permutations))
    return a, b


def signatures(tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray, ngram: int, permutations: int,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(MinHash signatures [docs with >= ngram tokens, permutations] uint32, those docs' indices).

    Shingle i of a document is its tokens i..i+ngram-1; documents shorter than one shingle get none
    (exact dedup still covers them).
    """
    has = np.flatnonzero(lengths >= ngram)
    counts = (lengths[has] - ngram + 1).astype(np.int64)
    sigs = np.empty((len(has), permutations), dtype=np.uint32)
    if not len(has):
        return sigs, has
    a, b = _family(permutations, seed)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    d = 0
    with np.errstate(over="ignore"):
        while d < len(has):
            # Whole documents per chunk, ~64k shingles (x permutations x 8 bytes) at a time.
            e = max(d + 1, int(np.searchsorted(bounds, bounds[d] + _CHUNK_SHINGLES, side="right")) - 1)
            c = counts[d:e]
            first = np.repeat(starts[has[d:e]], c) + (np.arange(int(c.sum())) - np.repeat(np.cumsum(c) - c, c))
            h = np.zeros(len(first), dtype=np.uint64)
            for j in range(ngram):
                h = h * _SHINGLE_MULT + tokens[first + j].astype(np.uint64)
            h = splitmix64(h)
            values = ((h[:, None] * a[None, :] + b[None, :]) >> np.uint64(32)).astype(np.uint32)
            sigs[d:e] = np.minimum.reduceat(values, np.cumsum(c) - c, axis=0)
            d = e
    return sigs, has


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """[docs, bands] uint64: one key per band of `rows` signature values; equal keys are LSH candidates."""
    keys = np.zeros((len(sigs), bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(bands):
            h = np.full(len(sigs), np.uint64(j), dtype=np.uint64)
            for v in sigs[:, j * rows: (j + 1) * rows].T:
                h = splitmix64(h * _SHINGLE_MULT + v.astype(np.uint64))
            keys[:, j] = h
    return keys


def near_duplicates(keys: np.ndarray, pos: np.ndarray, sig8: np.ndarray | None = None,
                    threshold: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(later, first): in every group of equal band keys, each document after the earliest, and the earliest.

    With `sig8` (8-bit signatures per record), only pairs whose estimated Jaccard reaches `threshold`.
    """
    order = np.lexsort((pos, keys))
    keys, pos = keys[order], pos[order]
    new = np.ones(len(keys), dtype=bool)
    new[1:] = keys[1:] != keys[:-1]
    first = np.flatnonzero(new)[np.cumsum(new) - 1]
    later = np.flatnonzero(~new)
    if sig8 is not None:
        sig8 = sig8[order]
        later = later[estimate_jaccard(sig8[later], sig8[first[later]]) >= threshold]
    return pos[later], pos[first[later]]
