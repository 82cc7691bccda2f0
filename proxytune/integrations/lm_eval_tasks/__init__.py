"""lm-evaluation-harness task definitions shipped with proxytune (``--include_path`` this directory; the
``proxytune-lm-eval`` command adds it): ``tinyworld_qa`` and ``tinyworld_choice`` over the held-out questions
of the shipped tinyworld family (``tinyworld_docs.py``, ``tinyworld_heldout.jsonl``)."""
