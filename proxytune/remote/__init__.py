"""A served base's transport and math (``docs/remote.md``; the rule: ``docs/semantics.md``, section 8): an
OpenAI-compatible completions server gives the base's top-k log-probs, the small models run locally. The
ensemble member is :class:`proxytune.RemoteModel` (``engine/remote_base.py``), which uses these:

* :mod:`proxytune.remote.client`: :class:`CompletionsClient` over httpx (the ``remote`` extra), :class:`RemoteError`;
* :mod:`proxytune.remote.rows`: the top-k set as a dense row for the op, by the tail rule (``drop``/``floor``/``all``);
* :mod:`proxytune.remote.blocks`: base-drafted blocks verified by the small models (exact speculative sampling).

Importing this package imports neither httpx nor a model.
"""

from proxytune.remote.rows import TAIL_RULES, check_tail, dense_rows

__all__ = ["TAIL_RULES", "check_tail", "dense_rows", "CompletionsClient", "RemoteError", "RemoteUnreachable"]


def __getattr__(name):
    if name in ("CompletionsClient", "RemoteError", "RemoteUnreachable", "Completion", "Scored"):
        from proxytune.remote import client

        return getattr(client, name)
    raise AttributeError(f"module 'proxytune.remote' has no attribute {name!r}")
