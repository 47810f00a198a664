"""Near-duplicate groups (pigeonhole buckets + union-find) against an all-pairs reference."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ml.data import near_duplicates
from ml.data.near_duplicates import near_duplicate_pairs


def hash_frame(values: np.ndarray, statuses: dict[int, str] | None = None) -> pd.DataFrame:
    frame = pd.DataFrame({"status": ["ok"] * len(values), "phash": [f"{int(v):016x}" for v in values]})
    for i, status in (statuses or {}).items():
        frame.loc[i, "status"] = status
    return frame


def brute_groups(values: np.ndarray, ok: np.ndarray, max_distance: int) -> list[list[int]]:
    """Connected components (size >= 2) of 'within max_distance bits', by all pairs and plain union-find."""
    parent = list(range(len(values)))

    def find(x: int) -> int:
        while parent[x] != x:
            x = parent[x]
        return x

    dist = np.bitwise_count(values[:, None] ^ values[None, :])
    for i, j in zip(*np.nonzero(dist <= max_distance), strict=True):
        if i < j and ok[i] and ok[j]:
            parent[find(int(j))] = find(int(i))
    groups: dict[int, list[int]] = {}
    for i in range(len(values)):
        if ok[i]:
            groups.setdefault(find(i), []).append(i)
    return sorted(g for g in groups.values() if len(g) >= 2)


def flipped(rng: np.random.Generator, base: int, n: int, max_flips: int) -> list[int]:
    out = []
    for _ in range(n):
        value = base
        for bit in rng.choice(64, size=int(rng.integers(0, max_flips + 1)), replace=False):
            value ^= 1 << int(bit)
        out.append(value)
    return out


def synthetic_hashes(kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    bases = [int(b) for b in rng.integers(0, 2**63, size=40)]
    if kind == "random":
        values = [int(v) for v in rng.integers(0, 2**63, size=600)] + [2**63 + 5, 5]
    elif kind == "clusters":
        values = [v for b in bases for v in flipped(rng, b, 15, 4)]
    elif kind == "chain":  # each hash a few bits from the previous: one long, thin group
        values = [bases[0]]
        for _ in range(599):
            values.append(flipped(rng, values[-1], 1, 7)[0])
    elif kind == "one_cluster":  # the reviewer's look-alikes: nearly every pair is near
        values = flipped(rng, bases[1], 600, 3)
    else:  # "low_bits": only 10 bits vary, so most chunk buckets are huge
        values = [int(v) for v in rng.integers(0, 2**10, size=600)]
    return np.array(values, dtype=np.uint64)


@pytest.mark.parametrize("kind", ["random", "clusters", "chain", "one_cluster", "low_bits"])
@pytest.mark.parametrize("max_distance", [0, 3, 6])
@pytest.mark.parametrize("dense_bucket", [2048, 4])
def test_near_duplicate_groups_equal_all_pairs_components(
    kind: str, max_distance: int, dense_bucket: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = synthetic_hashes(kind, seed=max_distance)
    statuses = {3: "undecodable", 10: "duplicate"}
    ok = np.array([i not in statuses for i in range(len(values))])
    monkeypatch.setattr(near_duplicates, "DENSE_BUCKET", dense_bucket)  # 4: the one-by-one path everywhere

    near = near_duplicates.near_duplicate_groups(hash_frame(values, statuses), max_distance)

    expected = brute_groups(values, ok, max_distance)
    assert sorted(m.tolist() for m in near.members()) == expected
    assert near.n_groups == len(expected)
    assert near.n_images == sum(len(g) for g in expected)
    assert (near.group[~ok] == -1).all()
    # ids follow each group's first row, so they do not depend on hash values
    firsts = [int(m[0]) for m in near.members()]
    assert firsts == sorted(firsts)


def test_near_duplicate_pairs_are_complete_below_the_limit_and_capped_above() -> None:
    far = 0xFFFF_FFFF_0000_0000  # 32 bits from 0
    values = np.array([0, 1, 3, far, far + 1, 0x5555_5555_5555_5555], dtype=np.uint64)  # rows 0-2 and 3-4

    assert near_duplicate_pairs(hash_frame(values)) == [(0, 1), (0, 2), (1, 2), (3, 4)]
    assert len(near_duplicate_pairs(hash_frame(np.zeros(300, dtype=np.uint64)), limit=50)) == 50


def test_max_distance_outside_the_hash_is_a_config_error() -> None:
    from ml.errors import ConfigError

    with pytest.raises(ConfigError, match="max_distance must be in 0..63 bits, got 64"):
        near_duplicates.near_duplicate_groups(hash_frame(np.zeros(3, dtype=np.uint64)), 64)
