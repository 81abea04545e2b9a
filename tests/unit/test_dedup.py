"""Exact and MinHash dedup on numpy arrays, against brute-force references."""

from __future__ import annotations

import numpy as np

from bigray.data.dedup import band_keys, first_occurrence, lsh_params, near_duplicates, signatures


def test_first_occurrence_keeps_the_earliest_of_each_hash():
    hashes = np.array([7, 3, 7, 9, 3, 3], dtype=np.uint64)
    np.testing.assert_array_equal(first_occurrence(hashes), [True, True, False, True, False, False])


def test_near_duplicates_pairs_each_later_document_with_the_earliest_of_its_bucket():
    keys = np.array([5, 1, 5, 1, 5, 2], dtype=np.uint64)
    pos = np.array([30, 11, 10, 12, 20, 1], dtype=np.int64)
    later, first = near_duplicates(keys, pos)
    assert sorted(zip(later.tolist(), first.tolist())) == [(12, 11), (20, 10), (30, 10)]


def shingles(doc: np.ndarray, n: int) -> set[tuple]:
    return {tuple(doc[i: i + n]) for i in range(len(doc) - n + 1)}


def test_signatures_estimate_jaccard():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 5000, 400)
    docs = [base]
    for edits in (5, 20, 60, 400):
        d = base.copy()
        d[rng.choice(len(d), edits, replace=False)] = rng.integers(5000, 9000, edits)
        docs.append(d)
    docs.append(base[:3])  # shorter than one shingle: no signature
    lengths = np.array([len(d) for d in docs])
    tokens = np.concatenate(docs).astype(np.uint16)
    sigs, has = signatures(tokens, np.cumsum(lengths) - lengths, lengths, ngram=5, permutations=256)
    assert has.tolist() == [0, 1, 2, 3, 4]
    for i in range(1, 5):
        a, b = shingles(docs[0], 5), shingles(docs[i], 5)
        true = len(a & b) / len(a | b)
        estimate = float((sigs[0] == sigs[i]).mean())
        assert abs(estimate - true) < 0.1, (i, true, estimate)
    # whole-batch chunking gives the same signatures as one document at a time
    one = signatures(docs[2].astype(np.uint16), np.array([0]), np.array([400]), ngram=5, permutations=256)[0]
    np.testing.assert_array_equal(one[0], sigs[2])


def test_lsh_params_and_band_keys():
    bands, rows = lsh_params(0.8, 128)
    assert bands * rows <= 128 and 0.7 < (1 / bands) ** (1 / rows) < 0.9
    sigs = np.random.default_rng(1).integers(0, 1 << 32, (3, 128), dtype=np.uint64).astype(np.uint32)
    sigs[1] = sigs[0]
    sigs[2, :rows] = sigs[0, :rows]  # shares only the first band
    keys = band_keys(sigs, bands, rows)
    assert (keys[0] == keys[1]).all() and keys[0, 0] == keys[2, 0] and (keys[0, 1:] != keys[2, 1:]).all()


def test_near_duplicate_pairs_are_verified_on_8_bit_signatures():
    rng = np.random.default_rng(2)
    sig8 = rng.integers(0, 256, (3, 128), dtype=np.uint8)
    sig8[1] = sig8[0]
    sig8[1, :12] ^= 1  # ~0.9 estimated Jaccard with doc 0; doc 2 is unrelated but collides in the band
    keys = np.array([4, 4, 4], dtype=np.uint64)
    later, first = near_duplicates(keys, np.array([0, 1, 2]), sig8, threshold=0.8)
    assert later.tolist() == [1] and first.tolist() == [0]
