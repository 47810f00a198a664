"""Near-duplicate images: groups of ok rows whose 64-bit pHashes differ in at most a few bits.

Exact, in O(n) memory. Pigeonhole: split the 64 bits into max_distance + 1 chunks; two hashes
within max_distance bits agree exactly on at least one chunk, so only hashes sharing a chunk
value ("a bucket") are ever compared, with popcount, and union-find joins the matches. Identical
hashes are collapsed first. Nothing quadratic is ever stored. Measured on 2 cores (VmHWM growth)::

    100,000 random hashes            1.7 s, +16 MB   (the old all-pairs scan: 56 s, +1 GB)
    100,000 look-alikes (<= 3 bits)  1.1 s,  +8 MB   (old: 5 G pairs; 8,000 of them took 40 s, 4.3 GB)
    100,000 in 10,000 clusters       2.5 s, +14 MB
    10,000 of any of these         < 0.1 s,  +5 MB

`ml.data.splits` keeps each group in one split; `ml.data.quality` fails a dataset whose groups
straddle train and test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ml.data.manifest import OK
from ml.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd

# pHashes this many bits apart (of 64) or fewer are the same picture re-encoded, resized or
# slightly edited; 6 is the usual threshold for a DCT pHash.
NEAR_DUPLICATE_BITS = 6
# near_duplicate_pairs is for examples: it stops after this many pairs.
MAX_LISTED_PAIRS = 10_000
# Cells (uint64) of one block of pairwise distances there: 4 M cells = 32 MB.
PAIR_BLOCK_CELLS = 4_000_000


def _phash_ints(manifest: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(row positions, uint64 hashes) of rows that are ok and have a pHash."""
    mask = (manifest["status"] == OK).to_numpy() & (manifest["phash"].astype(str).str.len() == 16).to_numpy()
    positions = np.flatnonzero(mask)
    values = np.array([int(h, 16) for h in manifest["phash"].to_numpy()[positions]], dtype=np.uint64)
    return positions, values


@dataclass(frozen=True)
class NearDuplicates:
    """Near-duplicate groups of a manifest (transitive closure of "pHashes within max_distance bits").

    Attributes:
        group: One entry per manifest row (by position): the row's group id in ``0..n_groups-1``,
            or -1 when the row is in no group (quarantined, no pHash, or no near-duplicate).
        n_groups: Groups with at least two rows.
    """

    group: np.ndarray
    n_groups: int

    @property
    def n_images(self) -> int:
        """Rows that belong to some group."""
        return int(np.count_nonzero(self.group >= 0))

    def members(self) -> list[np.ndarray]:
        """Row positions of each group, by group id (each array ascending)."""
        in_group = np.flatnonzero(self.group >= 0)
        order = in_group[np.argsort(self.group[in_group], kind="stable")]
        bounds = np.flatnonzero(np.diff(self.group[order])) + 1
        return np.split(order, bounds) if order.size else []


def _chunks(max_distance: int) -> list[tuple[int, np.uint64]]:
    """(shift, mask) of max_distance + 1 chunks covering the 64 bits as evenly as possible."""
    count = max_distance + 1
    widths = [64 // count + (1 if i < 64 % count else 0) for i in range(count)]
    out, shift = [], 0
    for width in widths:
        out.append((shift, np.uint64((1 << width) - 1)))
        shift += width
    return out


def _find(parent: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    """Roots of `nodes` (vectorised; parents always point to smaller indices, so this ends)."""
    roots = parent[nodes]
    while True:
        up = parent[roots]
        if np.array_equal(up, roots):
            return roots
        roots = up


def _union(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Join the components of every edge (a[k], b[k]); each root is hooked onto a smaller one."""
    touched = np.concatenate([a, b])
    while a.size:
        ra, rb = _find(parent, a), _find(parent, b)
        differ = ra != rb
        if not differ.any():
            break
        lo, hi = np.minimum(ra[differ], rb[differ]), np.maximum(ra[differ], rb[differ])
        np.minimum.at(parent, hi, lo)
        a, b = lo, hi
    parent[touched] = _find(parent, touched)  # path compression keeps later finds short


# A bucket with more distinct hashes than this is merged one hash at a time, skipping hashes
# already in the same component (a cluster of look-alikes then costs O(bucket), not O(bucket^2));
# smaller buckets are compared all pairs at once, which is faster for the typical bucket of a few
# hundred. 2,048 hashes = 2.1 M pairs, ~50 MB of temporaries.
DENSE_BUCKET = 2048


def _sparse_buckets(
    values: np.ndarray,
    parent: np.ndarray,
    order: np.ndarray,
    starts: np.ndarray,
    sizes: np.ndarray,
    max_distance: int,
    earlier: list[np.ndarray],
) -> None:
    """All-pairs check inside buckets of 2..DENSE_BUCKET hashes, one diagonal at a time.

    `order` lists hash indices sorted by this chunk's value; diagonal k pairs sorted position p
    with p + k when both are in the same bucket, so memory stays O(n) per step.
    """
    bucket_size = np.repeat(sizes, sizes)
    offset = np.arange(len(order)) - np.repeat(starts, sizes)
    active = np.flatnonzero((bucket_size >= 2) & (bucket_size <= DENSE_BUCKET))
    k = 1
    while active.size:
        active = active[offset[active] + k < bucket_size[active]]
        if not active.size:
            break
        a, b = order[active], order[active + k]
        near = np.bitwise_count(values[a] ^ values[b]) <= max_distance
        for keys in earlier:  # a pair sharing an earlier chunk was already joined there
            near &= keys[a] != keys[b]
        if near.any():
            _union(parent, a[near], b[near])
        k += 1


def _dense_bucket(values: np.ndarray, parent: np.ndarray, members: np.ndarray, max_distance: int) -> None:
    """Join near hashes of one big bucket, comparing each hash only with other components."""
    vals = values[members]
    labels = _find(parent, members)
    for t in range(len(members) - 1):
        rest = t + 1 + np.flatnonzero(labels[t + 1 :] != labels[t])
        if not rest.size:
            continue
        hits = rest[np.bitwise_count(vals[rest] ^ vals[t]) <= max_distance]
        if not hits.size:
            continue
        roots = np.unique(np.append(labels[hits], labels[t]))
        parent[roots] = roots[0]
        labels[np.isin(labels, roots)] = roots[0]
        if labels.min() == labels.max():
            return  # the whole bucket is one component: nothing left to learn here


def near_duplicate_groups(manifest: pd.DataFrame, max_distance: int = NEAR_DUPLICATE_BITS) -> NearDuplicates:
    """Group ok rows whose pHashes differ in at most `max_distance` bits (transitively).

    Exact. Memory is O(rows); time is near-linear for unrelated images and for clusters of
    look-alikes (see the measurements above), quadratic only inside one chunk bucket of mutually
    distant hashes (30,000 hashes sharing 10 bits and nothing else: 2.8 s), which photos do not produce.

    Raises:
        ConfigError: `max_distance` outside 0..63.
    """
    if not 0 <= max_distance <= 63:
        raise ConfigError(f"near-duplicate max_distance must be in 0..63 bits, got {max_distance}")
    positions, hashes = _phash_ints(manifest)
    group = np.full(len(manifest), -1, dtype=np.int64)
    if not positions.size:
        return NearDuplicates(group, 0)
    values, inverse = np.unique(hashes, return_inverse=True)
    parent = np.arange(len(values), dtype=np.int64)
    earlier: list[np.ndarray] = []
    for shift, mask in _chunks(max_distance):
        keys = (values >> np.uint64(shift)) & mask
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.concatenate([[True], sorted_keys[1:] != sorted_keys[:-1]]))
        sizes = np.diff(np.append(starts, len(order)))
        _sparse_buckets(values, parent, order, starts, sizes, max_distance, earlier)
        dense = sizes > DENSE_BUCKET
        for start, size in zip(starts[dense].tolist(), sizes[dense].tolist(), strict=True):
            _dense_bucket(values, parent, order[start : start + size], max_distance)
        earlier.append(keys)
    root_of_row = _find(parent, np.arange(len(values)))[inverse]
    rows_per_root = np.bincount(root_of_row, minlength=len(values))
    grouped = rows_per_root[root_of_row] >= 2
    # Ids in order of each group's first row, so they do not depend on hash values.
    roots_in_order = root_of_row[grouped]
    _, first = np.unique(roots_in_order, return_index=True)
    ranking = np.full(len(values), -1, dtype=np.int64)
    ranked_roots = roots_in_order[np.sort(first)]
    ranking[ranked_roots] = np.arange(len(ranked_roots))
    group[positions[grouped]] = ranking[roots_in_order]
    return NearDuplicates(group, len(ranked_roots))


def near_duplicate_pairs(
    manifest: pd.DataFrame, max_distance: int = NEAR_DUPLICATE_BITS, *, limit: int = MAX_LISTED_PAIRS
) -> list[tuple[int, int]]:
    """Up to `limit` pairs (i, j), i < j, of ok row positions whose pHashes differ in <= max_distance bits.

    For examples and diagnostics: the list is complete when there are at most `limit` pairs (sorted),
    otherwise it holds `limit` of them. Only members of one near-duplicate group are compared.
    """
    positions, hashes = _phash_ints(manifest)
    by_position = dict(zip(positions.tolist(), hashes.tolist(), strict=True))
    pairs: list[tuple[int, int]] = []
    for members in near_duplicate_groups(manifest, max_distance).members():
        vals = np.array([by_position[int(p)] for p in members], dtype=np.uint64)
        block = max(1, PAIR_BLOCK_CELLS // len(members))
        for start in range(0, len(members), block):
            dist = np.bitwise_count(vals[start : start + block, None] ^ vals[None, :])
            ii, jj = np.nonzero(dist <= max_distance)
            keep = np.flatnonzero(jj > ii + start)[: limit - len(pairs)]
            pairs.extend(zip(members[ii[keep] + start].tolist(), members[jj[keep]].tolist(), strict=True))
            if len(pairs) >= limit:
                return sorted(pairs)
    return sorted(pairs)
