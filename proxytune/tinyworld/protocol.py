"""The tiny family's evaluation protocol: the split and the weight rules, fixed before any number.

Rules fixed in code before any validation or test number was produced (see the git log):

**The split.** The held-out people are taken in the world's order (``World.eval_ids``: entities ``n_tune`` ..
the last). The k-th of them (k = 0, 1, 2, ...) belongs to the **validation** half when k is even and to the
**test** half when k is odd; each person's questions (one per attribute) go with the person, so no fact of a
person is asked on both sides. For the shipped family (200 held-out people, 4 questions each) that is 100
people and 400 questions per half; ``all`` is every held-out question (800), in the world's order.

**The grid.** :data:`ALPHA_GRID` (0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 2, 2.5, 3): the weights of the recorded
run. Weight 0 is the large base alone (a check: it must score as the large base does).

**The choice.** :func:`choose_weight`: the weight with the most exact matches on the validation half; ties go
to the weight nearer 1 (the paper's default), then to the smaller weight. Only validation answers enter it;
the test half is then reported at weight 1 and at the chosen weight.
"""

from __future__ import annotations

from typing import Mapping, Sequence

__all__ = ["SPLITS", "ALPHA_GRID", "split_of_person", "split_questions", "choose_weight"]

SPLITS = ("validation", "test", "all")
ALPHA_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)


def split_of_person(k: int) -> str:
    """The half of the k-th held-out person (k counts from 0 in the world's order): even validation, odd test."""
    return "validation" if k % 2 == 0 else "test"


def split_questions(world, questions: Sequence, split: str) -> list:
    """The questions of ``split`` ("validation", "test" or "all"), in their given order.

    ``questions`` are held-out questions of ``world`` (``QA`` with an ``entity`` id); a question about a person
    outside the held-out ones is a ``ValueError``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    rank = {entity: k for k, entity in enumerate(world.eval_ids)}
    for q in questions:
        if q.entity not in rank:
            raise ValueError(f"entity {q.entity} is not a held-out person of this world")
    if split == "all":
        return list(questions)
    return [q for q in questions if split_of_person(rank[q.entity]) == split]


def choose_weight(correct_by_weight: Mapping[float, int]) -> float:
    """The chosen weight from validation exact matches (``weight -> number of right answers``): the most right
    answers; ties to the weight nearer 1, then to the smaller weight."""
    if not correct_by_weight:
        raise ValueError("no weights to choose from")
    return min(correct_by_weight, key=lambda w: (-correct_by_weight[w], abs(w - 1.0), w))
