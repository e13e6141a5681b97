"""Near-dedup on Ray Data: the local numpy MinHash LSH (`filter.dedup`), distributed.

    texts ──map_batches──► signatures (i, sig)                      one row per text with shingles
          ──map_batches──► band rows (band, key, i)                  b rows per text
          ──hash shuffle on (band, key)──► candidate pairs (i, j)    per bucket, as `_bucket_pairs`
          ──hash shuffle on i with the signatures──► (j, i, sig_i)
          ──hash shuffle on j with the signatures──► pairs whose signatures agree on >= threshold
          ──driver──► connected components (scipy) ──► label = smallest index in the cluster

Every step computes what the local path computes, so the clusters are identical (the test
checks it on 20k rows): a text's signature depends only on the text (the permutations come from
the same seed), band keys are the same splitmix64 folds, a bucket yields the same (first, each
other) and (each, its successor) pairs over its members in index order, and the Jaccard check
is the same count of agreeing slots. Only the components are found on the driver: verified
pairs are few (near-duplicates, not all rows), 16 bytes each.

The two lookups are joins done by hand: signature rows and pair rows share one schema (k, other,
sig), are hash-partitioned together on k, and each block matches its own rows in numpy. Ray
Data's `Dataset.join` would do the same through polars, whose worker threads crashed Ray workers
here (SIGABRT, corrupt mutex) on the 100k-row benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from distill.filter.dedup import _mix64, lsh_bands, minhash_signatures

_NO_SIG = -1
"""`other` of a signature row (pair rows hold the other index of their pair there)."""


def encode(sig: np.ndarray) -> Any:
    """[rows, num_perm] uint32 signatures as an Arrow binary column (one value per row), built
    from the buffer, no per-row Python."""
    import pyarrow as pa

    sig = np.ascontiguousarray(sig, dtype=np.uint32)
    offsets = np.arange(len(sig) + 1, dtype=np.int32) * np.int32(sig.shape[1] * 4)
    return pa.BinaryArray.from_buffers(pa.binary(), len(sig),
                                       [None, pa.py_buffer(offsets), pa.py_buffer(sig)])


def empty_sigs(n: int) -> Any:
    import pyarrow as pa

    return pa.BinaryArray.from_buffers(pa.binary(), n, [
        None, pa.py_buffer(np.zeros(n + 1, dtype=np.int32)), pa.py_buffer(b"")])


def decode(column: Any, num_perm: int) -> np.ndarray:
    """An Arrow binary column of signatures (all of them present) as [rows, num_perm]."""
    import pyarrow as pa

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(arr) == 0:
        return np.zeros((0, num_perm), dtype=np.uint32)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset : arr.offset + len(arr)
                                                              + 1]
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    return data.view(np.uint32).reshape(len(arr), num_perm)


def _signatures(batch: Any, num_perm: int, ngram: int) -> Any:
    """(i, sig) of the texts in a block that have shingles (`minhash_signatures`, per block:
    a text's signature does not depend on the other texts)."""
    import pyarrow as pa

    sig, nonempty = minhash_signatures([str(t) for t in batch["text"].to_pylist()], num_perm,
                                       ngram)
    ids = batch["i"].to_numpy().astype(np.int64)[nonempty]
    return pa.table({"i": ids, "sig": encode(sig[:, nonempty].T)})


def _band_rows(batch: Any, bands: int, rows: int, num_perm: int) -> dict[str, Any]:
    """One row per (text, band): the band's key folded as `_numpy_pairs` folds it."""
    ids, sig = batch["i"].to_numpy().astype(np.int64), decode(batch["sig"], num_perm)
    keys = []
    for band in range(bands):
        key = np.full(len(ids), band, dtype=np.uint64)
        for slot in range(band * rows, (band + 1) * rows):
            key = _mix64(key ^ sig[:, slot].astype(np.uint64))
        keys.append(key)
    return {"band": np.repeat(np.arange(bands, dtype=np.int16), len(ids)),
            "key": np.concatenate(keys) if keys else np.zeros(0, np.uint64),
            "i": np.tile(ids, bands)}


def bucket_pairs(band: np.ndarray, key: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray,
                                                                              np.ndarray]:
    """Candidate pairs of every (band, key) bucket: (first, each other) and (each, its
    successor), members in ascending index order (what `_bucket_pairs` gives per band)."""
    order = np.lexsort((ids, key, band))
    band, key, ids = band[order], key[order], ids[order]
    same = np.concatenate([[False], (key[1:] == key[:-1]) & (band[1:] == band[:-1])])
    if not same.any():
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    first = ids[~same][np.cumsum(~same) - 1]
    nxt = same[1:]
    return (np.concatenate([first[same], ids[:-1][nxt]]),
            np.concatenate([ids[same], ids[1:][nxt]]))


def _pairs_of_block(batch: dict[str, np.ndarray]) -> Any:
    """A block holds whole buckets (hash-partitioned on band and key): its pairs, keyed for
    the first lookup (k = i, other = j)."""
    import pyarrow as pa

    i, j = bucket_pairs(np.asarray(batch["band"]), np.asarray(batch["key"]),
                        np.asarray(batch["i"], dtype=np.int64))
    return pa.table({"k": i, "other": j, "sig": empty_sigs(len(i))})


def _signature_rows(batch: Any) -> Any:
    import pyarrow as pa

    n = batch.num_rows
    return pa.table({"k": batch["i"], "other": pa.array(np.full(n, _NO_SIG, dtype=np.int64)),
                     "sig": batch["sig"]})


def _split(batch: Any, num_perm: int) -> tuple[np.ndarray, np.ndarray, Any]:
    """A block's signature rows as (sorted k, their signatures) and the mask of pair rows."""
    k = batch["k"].to_numpy().astype(np.int64)
    is_sig = batch["other"].to_numpy() == _NO_SIG
    sig_k = k[is_sig]
    sigs = decode(batch.filter(is_sig)["sig"], num_perm)
    order = np.argsort(sig_k, kind="stable")
    return sig_k[order], sigs[order], ~is_sig


def _lookup(sorted_k: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Positions of `wanted` in `sorted_k` (every candidate index has a signature row)."""
    pos = np.searchsorted(sorted_k, wanted)
    assert len(wanted) == 0 or (pos < len(sorted_k)).all() and (
        sorted_k[np.minimum(pos, len(sorted_k) - 1)] == wanted).all(), "signature missing"
    return pos


def _attach_first(batch: Any, num_perm: int) -> Any:
    """Pairs keyed by i get sig_i, and are re-keyed by j (k = j, other = i) for the second.
    A pair found in several bands meets its copies here (all keyed by the same i): it goes on
    once (~14x fewer signatures through the second shuffle on the benchmark corpus)."""
    import pyarrow as pa

    sig_k, sigs, is_pair = _split(batch, num_perm)
    i = batch["k"].to_numpy().astype(np.int64)[is_pair]
    j = batch["other"].to_numpy().astype(np.int64)[is_pair]
    order = np.lexsort((j, i))
    i, j = i[order], j[order]
    first = np.concatenate([[True], (i[1:] != i[:-1]) | (j[1:] != j[:-1])]) if len(i) else i > 0
    i, j = i[first], j[first]
    return pa.table({"k": j, "other": i, "sig": encode(sigs[_lookup(sig_k, i)]
                                                       if len(i) else sigs[:0])})


def _agreeing(batch: Any, num_perm: int, need: int) -> dict[str, Any]:
    """Pairs keyed by j (carrying sig_i) meet sig_j: kept when >= need slots agree."""
    sig_k, sigs, is_pair = _split(batch, num_perm)
    pairs = batch.filter(is_pair)
    j = pairs["k"].to_numpy().astype(np.int64)
    i = pairs["other"].to_numpy().astype(np.int64)
    sig_i = decode(pairs["sig"], num_perm)
    sig_j = sigs[_lookup(sig_k, j)] if len(j) else sig_i
    keep = np.count_nonzero(sig_i == sig_j, axis=1) >= need
    return {"i": i[keep], "j": j[keep]}


def verified_pairs(ds: Any, threshold: float, num_perm: int, ngram: int, partitions: int
                   ) -> np.ndarray:
    """Index pairs (i < j) of a Ray dataset with columns `i` (int) and `text` whose MinHash
    Jaccard estimate is >= threshold: what `filter.dedup.near_duplicate_pairs` gives (each pair
    once, sorted)."""
    b, r = lsh_bands(threshold, num_perm)
    arrow = {"batch_format": "pyarrow", "batch_size": None}
    sig = ds.map_batches(_signatures, fn_kwargs={"num_perm": num_perm, "ngram": ngram},
                         **arrow).materialize()
    sig_rows = sig.map_batches(_signature_rows, **arrow)  # cheap: recomputed per use
    cand = (sig.map_batches(_band_rows, fn_kwargs={"bands": b, "rows": r, "num_perm": num_perm},
                            **arrow)
            .repartition(partitions, keys=["band", "key"])
            .map_batches(_pairs_of_block, batch_format="numpy", batch_size=None))
    need = int(np.ceil(threshold * num_perm - 1e-9))
    half = (sig_rows.union(cand).repartition(partitions, keys=["k"])
            .map_batches(_attach_first, fn_kwargs={"num_perm": num_perm}, **arrow))
    checked = (sig_rows.union(half).repartition(partitions, keys=["k"])
               .map_batches(_agreeing, fn_kwargs={"num_perm": num_perm, "need": need}, **arrow))
    parts = [np.stack([np.asarray(x["i"], dtype=np.int64), np.asarray(x["j"], dtype=np.int64)],
                      axis=1)
             for x in checked.iter_batches(batch_format="numpy", batch_size=None)]
    pairs = np.concatenate(parts) if parts else np.zeros((0, 2), dtype=np.int64)
    return np.unique(pairs, axis=0) if len(pairs) else pairs


def component_labels(n: int, pairs: np.ndarray) -> np.ndarray:
    """The smallest index of each item's connected component (what `UnionFind.labels` gives),
    in C (scipy): 100M items cost ~1 GB here, not a Python list per item."""
    if not len(pairs):
        return np.arange(n, dtype=np.int64)
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])),
                       shape=(n, n))
    count, comp = connected_components(graph, directed=False)
    smallest = np.full(count, n, dtype=np.int64)
    np.minimum.at(smallest, comp, np.arange(n, dtype=np.int64))
    return smallest[comp]


def text_dataset(texts: Sequence[str], blocks: int) -> Any:
    """Texts as a Ray dataset (i, text) of `blocks` contiguous blocks."""
    import pyarrow as pa
    import ray.data

    n = len(texts)
    step = max(1, -(-n // max(1, blocks)))
    tables = [pa.table({"i": np.arange(lo, min(lo + step, n), dtype=np.int64),
                        "text": pa.array(list(texts[lo : lo + step]), type=pa.string())})
              for lo in range(0, n, step)]
    return ray.data.from_arrow(tables)


def default_blocks() -> int:
    """Two blocks (and shuffle partitions) per CPU of the cluster."""
    import ray

    return max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))


def near_duplicate_clusters(texts: Sequence[str], threshold: float = 0.55, num_perm: int = 128,
                            ngram: int = 2, blocks: int | None = None) -> list[int]:
    """`filter.dedup.near_duplicate_clusters` on the connected Ray cluster."""
    if not texts:
        return []
    blocks = blocks or default_blocks()
    pairs = verified_pairs(text_dataset(texts, blocks), threshold, num_perm, ngram, blocks)
    labels: list[int] = component_labels(len(texts), pairs).tolist()
    return labels


def near_clusters(texts: Sequence[str], threshold: float, num_perm: int, ngram: int,
                  backend: str, *, executor: Any) -> list[int]:
    """The filter stage's near-dedup under `executor.kind: ray`: Ray Data from
    `executor.dedup_min_rows` texts on (numpy engine), else the local path (the same clusters;
    a Ray Data job costs seconds to start)."""
    from distill.filter import dedup

    if backend != "numpy" or len(texts) < executor.dedup_min_rows:
        return dedup.near_duplicate_clusters(texts, threshold, num_perm, ngram, backend)
    from distill.executor import connect

    connect(executor)
    return near_duplicate_clusters(texts, threshold, num_perm, ngram, executor.dedup_blocks)
