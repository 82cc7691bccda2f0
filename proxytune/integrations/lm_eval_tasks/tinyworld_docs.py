"""Documents of the two tinyworld lm-eval tasks (loaded by their YAML as ``custom_dataset``).

``tinyworld_heldout.jsonl`` holds the 800 held-out questions of the shipped family, in the order of
``proxytune.tinyworld.evaluation.world_of().eval_questions()`` (what ``proxytune eval`` asks): ``prompt``
(``Question: ...\\nAnswer:``), ``answer`` (the strict completion, `` Velmora.``), ``attribute`` and ``entity``.
:func:`load` adds ``choices`` (every value of the attribute, in the answer format: ``Velmora.``) and ``gold``
(the right one's index) for the multiple-choice task. ``python -m proxytune.integrations.lm_eval_tasks.tinyworld_docs``
writes the jsonl again from the world.
"""

from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).with_name("tinyworld_heldout.jsonl")


def records(models_dir=None) -> list[dict]:
    """The held-out questions of the family in ``models_dir`` (default: the shipped one), as jsonl records."""
    from proxytune.tinyworld.evaluation import world_of

    return [{"entity": q.entity, "attribute": q.attribute, "prompt": q.prompt, "answer": q.answer}
            for q in world_of(models_dir).eval_questions()]  # fmt: skip


def with_choices(doc: dict) -> dict:
    from proxytune.tinyworld.world import VALUES

    choices = [f"{v}." for v in VALUES[doc["attribute"]]]
    return {**doc, "choices": choices, "gold": choices.index(doc["answer"].strip())}


def load(**_: object):
    """The ``test`` split (lm-eval calls this with the task's metadata, which it does not need)."""
    import datasets

    with open(DATA, encoding="utf-8") as f:
        docs = [with_choices(json.loads(line)) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


if __name__ == "__main__":
    with open(DATA, "w", encoding="utf-8") as f:
        for r in records():
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {DATA}")
