"""Same answers: top-10 id agreement between systems, and each system's dev nDCG@10."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from shopserve.export.data import Judgments
from shopserve.export.metrics import ndcg_at_k

K = 10


@dataclass(frozen=True)
class Agreement:
    queries: int
    overlap: float  # mean share of the reference's top-10 ids that the other system returns
    same_list: float  # share of queries whose top-10 id lists are identical, order included

    def as_dict(self) -> dict:
        return asdict(self)


def agreement(reference: Sequence[Sequence[int]], other: Sequence[Sequence[int]]) -> Agreement:
    if len(reference) != len(other) or not reference:
        raise ValueError(f"cannot compare {len(reference)} answers with {len(other)}")
    overlap = same = 0.0
    for ref, oth in zip(reference, other, strict=True):
        ref, oth = list(ref)[:K], list(oth)[:K]
        overlap += len(set(ref) & set(oth)) / max(len(ref), 1)
        same += ref == oth
    return Agreement(len(reference), overlap / len(reference), same / len(reference))


def dev_ndcg(
    queries: Sequence[str], answers: Sequence[Sequence[int]], judgments: Judgments
) -> float:
    """Mean nDCG@10 of the served top-10 over judged queries (unjudged products gain 0)."""
    total = sum(
        ndcg_at_k(list(ids), judgments.gains(query), K)
        for query, ids in zip(queries, answers, strict=True)
    )
    return total / len(queries)
