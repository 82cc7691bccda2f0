"""A base you can only call: a model served by an OpenAI-compatible completions server (vLLM, SGLang, TGI) as
an ensemble member (``docs/semantics.md`` section 8; the transport is :mod:`proxytune.remote.client`).

:class:`RemoteModel` is a :class:`~proxytune.engine.members.Member`: the ensemble, the decoders and scoring
take it where they take a local base. Its runner (:class:`RemoteRunner`) keeps each row's token ids on the
host and turns what the server returns for a position (the log-probs of its top-``k`` set) into a dense fp32
row of the common vocabulary by the tail rule (:func:`proxytune.remote.rows.dense_rows`), the "logits" the op
combines:

* ``prefill`` / ``step``: one request per row (concurrent over the rows; the server batches them) for one
  token, whose draw is unused: the row of the next position;
* ``extend`` (the expert-drafted speculative decoder's verification) and ``score_logits``: one request per row
  whose ``prompt_logprobs`` give the rows at the last ``n`` positions;
* ``draft``: base-drafted blocks (:class:`~proxytune.engine.base_draft_decoder.BaseDraftDecoder`): ``n``
  tokens drawn by the server from the base itself, with their rows.

Every method syncs with the host (the ids go over HTTP). Rows land on the ensemble's device (the first local
member's when the base names none).
"""

from __future__ import annotations

import numbers
from typing import Any, Optional, Sequence, Union

import torch

from proxytune.engine.members import Member
from proxytune.remote.client import RemoteError
from proxytune.remote.rows import check_tail, dense_rows

__all__ = ["RemoteModel", "RemoteRunner", "MAX_BLOCK", "FIRST_BLOCK", "check_logprobs", "check_tail_choice", "check_block"]

FIRST_BLOCK, MAX_BLOCK = 4, 16  # block="adaptive": each row starts at 4 drafts and grows to at most 16


def _integer(value: Any) -> Optional[int]:
    """An integer given as one or as decimal text (command lines, lm-eval's model args), else None."""
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return None


def check_logprobs(logprobs: Any, name: str = "logprobs") -> Union[int, str]:
    """The top ``k`` asked per position: an integer >= 1 (or its text) or ``"all"``."""
    if logprobs == "all":
        return "all"
    k = _integer(logprobs)
    if k is None or k < 1:
        raise ValueError(f"{name} must be an integer >= 1 or 'all', got {logprobs!r}")
    return k


def check_tail_choice(tail: Any, name: str = "tail") -> str:
    """``"drop"`` or ``"floor"`` (the tail rules a caller picks; ``"all"`` follows from ``logprobs="all"``)."""
    if tail not in ("drop", "floor"):
        raise ValueError(f"{name} must be 'drop' or 'floor', got {tail!r}")
    return tail


def check_block(block: Any, tail: str, name: str = "block", tail_name: str = "tail") -> Union[int, str]:
    """The block rule: None -> ``"adaptive"`` (``1`` under ``floor``), an integer >= 1 (or its text), or
    ``"adaptive"``; under ``floor`` only 1: a drafted block would need the draft's law outside the top k,
    which no server gives."""
    if block is None:
        return 1 if tail == "floor" else "adaptive"
    n = None if block == "adaptive" else _integer(block)
    if block != "adaptive" and (n is None or n < 1):
        raise ValueError(f"{name} must be an integer >= 1 or 'adaptive', got {block!r}")
    if tail == "floor" and n != 1:
        raise ValueError(f"{name}={block} with {tail_name}=floor: a drafted block is verified against the base's law "
                         f"outside its top k, which no server returns, so floor asks one token per request; use "
                         f"{name}=1 or {tail_name}=drop")  # fmt: skip
    return "adaptive" if n is None else n


class RemoteModel(Member):
    """A base served over HTTP (``POST /v1/completions`` with token-id prompts and top-k log-probs).

    Parameters
    ----------
    url : ``http(s)://host:port`` of the server (a trailing ``/v1`` is accepted)
    model : the served model's name; None: the only one the server serves
    logprobs : the top ``k`` asked per position (at most the server's cap: vLLM's ``--max-logprobs``), or
        ``"all"``: the whole vocabulary (the server started with ``--max-logprobs -1``); then the result
        equals local proxy-tuning token for token
    tail : ``"drop"`` (tokens outside the top k cannot be drawn) or ``"floor"`` (they get the smallest
        returned log-prob); ignored for ``logprobs="all"``
    block : tokens drafted by the base per request (:class:`~proxytune.engine.base_draft_decoder.BaseDraftDecoder`):
        an integer (``1``: one request per token), or ``"adaptive"`` (each row from 4 up to 16 by its
        acceptance); default ``"adaptive"``, and ``1`` under ``floor`` (the only size it allows)
    api_key : bearer token; default the environment's ``PROXYTUNE_API_KEY``, else ``OPENAI_API_KEY``
    timeout, max_retries : per request (see :class:`~proxytune.remote.client.CompletionsClient`)
    max_concurrency : the most requests in flight (a batch's rows are concurrent requests; the server batches
        them)
    device : where its rows land (default: the ensemble's sampling device, the first local member's)
    transport : an ``httpx`` transport (tests)

    Nothing is contacted until :meth:`connect` (``Ensemble.load`` calls it before the local models load: the model name, the position limit and the ``logprobs`` cap) or :meth:`join` (then the
    tokenizer too is checked against the server).
    """

    tokenizer = None
    template = None
    module = None  # no weights here: the eager decoders only
    width = None  # until it joins: then its tokenizer's length (the shared tokenizer's; rows are V wide)

    def __init__(self, url: str, model: Optional[str] = None, *, logprobs: Union[int, str] = 20, tail: str = "drop",
                 block: Union[None, int, str] = None, api_key: Optional[str] = None, timeout: float = 60.0,
                 max_retries: int = 3, max_concurrency: int = 16, device: Union[str, torch.device, None] = None,
                 transport: Any = None, name: str = "base"):  # fmt: skip
        from proxytune.remote.client import CompletionsClient

        self.logprobs = check_logprobs(logprobs)
        self.tail = check_tail("all" if self.logprobs == "all" else check_tail_choice(tail))
        self.block = check_block(block, self.tail)
        self.client = CompletionsClient(url, model, api_key, timeout=timeout, max_retries=max_retries,
                                        max_concurrency=max_concurrency, transport=transport)  # fmt: skip
        self.name, self.source = name, f"{self.client.url} ({model or 'its served model'})"
        self.device = torch.device(device) if device is not None else None
        self.vocab_size: Optional[int] = None
        self._limit: Optional[int] = None
        self.tokenizer_checked: Optional[bool] = None
        self._connected = False

    def __repr__(self) -> str:
        return (f"RemoteModel({self.client.url!r}, model={self.client.model!r}, logprobs={self.logprobs!r}, "
                f"tail={self.tail!r}, block={self.block!r})")  # fmt: skip

    def close(self) -> None:
        """Close the HTTP connections (the member cannot run afterwards)."""
        self.client.close()

    @property
    def k(self) -> int:
        """The request's ``logprobs``: ``k``, or ``-1`` for the whole vocabulary."""
        return -1 if self.logprobs == "all" else self.logprobs

    @property
    def drafts_blocks(self) -> bool:
        """Whether generation drafts blocks on the server (block other than 1)."""
        return self.block != 1

    @property
    def position_limit(self) -> Optional[int]:
        return self._limit

    def connect(self) -> None:
        """Ask the server for its models (the name checked: the list it serves, if not; the position limit
        read), then for one token with the top ``logprobs`` (a ``logprobs`` above the server's cap: the
        server's refusal, naming ``logprobs``). ``Ensemble.load`` calls it before loading the local models, so
        a wrong URL or ``logprobs`` fails in seconds."""
        if self._connected:
            return
        self.client.check_model()
        self.source = f"{self.client.url} ({self.client.model})"
        served = self.client.max_model_len()
        # Every request asks for at least one position past what it sends (max_tokens >= 1): the server takes
        # at most max_model_len - 1 fed positions, scoring's count (a local model's limit counts fed positions).
        self._limit = None if served is None else served - 1
        try:
            self.client.complete([0], 1, logprobs=self.k, temperature=0.0, extra={"ignore_eos": True})
        except RemoteError as e:
            if e.status is None or not 400 <= e.status < 500:
                raise
            raise RemoteError(f"logprobs={self.logprobs} (the top-k asked per position): {e}", url=e.url,
                              status=e.status, server_message=e.server_message) from None  # fmt: skip
        self._connected = True

    def join(self, tokenizer: Any, vocab_size: int, device: torch.device) -> None:
        """Called by the ensemble: check the served model's name (the list the server serves, if not), read
        its position limit and check its tokenizer against the shared one (``/tokenize``; one warning where
        the server cannot tell). Raises :class:`~proxytune.remote.client.RemoteError` (unreachable:
        :class:`~proxytune.remote.client.RemoteUnreachable`)."""
        from proxytune.remote.client import check_same_tokenizer

        self.connect()
        self.tokenizer_checked = check_same_tokenizer(self.client, tokenizer)
        self.vocab_size = vocab_size
        self.width = len(tokenizer)  # the served model's tokenizer is the shared one (checked above, or warned)
        if self.device is None:
            self.device = device

    def runner(self, use_cache: bool = True) -> "RemoteRunner":
        return RemoteRunner(self)

    def rows(self, tops: Sequence[dict], tail: Optional[str] = None) -> torch.Tensor:
        """Dense fp32 rows ``[N, V]`` of ``N`` positions' top-k sets, on this member's device. A position
        whose set has no token below ``V`` is a :class:`~proxytune.remote.client.RemoteError`."""
        if self.vocab_size is None:
            raise RuntimeError(f"{self.name}: the remote model must join an ensemble before it runs")
        out = dense_rows(tops, self.vocab_size, tail or self.tail)
        if not torch.isfinite(out).any(dim=1).all():
            raise RemoteError(f"{self.name}: {self.client.url} returned no token below {self.vocab_size} (the local "
                              f"vocabulary) in the top {self.k} of a position: nothing can be drawn there",
                              url=self.client.url)  # fmt: skip
        return out if self.device is None else out.to(self.device)

    def next_rows(self, rows: Sequence[list[int]], count: int = 1) -> torch.Tensor:
        """``[B, count, V]``: the rows after each of the last ``count`` positions of each row of ids, one
        concurrent request per row."""
        c = self.client
        if count == 1:
            done = c.complete_many([dict(prompt_ids=ids, max_tokens=1, logprobs=self.k, temperature=0.0,
                                         extra={"ignore_eos": True}) for ids in rows])  # fmt: skip
            tops = [r.top[:1] for r in done]
        else:
            tops = c.map(lambda ids: c.next_tops(ids, count, logprobs=self.k), rows)
        for ids, t in zip(rows, tops):
            if len(t) != count:
                raise RemoteError(f"{self.name}: {c.url} gave {len(t)} positions for a row of {len(ids)} tokens, "
                                  f"asked for {count}", url=c.url)  # fmt: skip
        return self.rows([x for t in tops for x in t]).view(len(rows), count, -1)

    def score_logits(self, ids: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
        """``[B, keep, V]``: the rows at the last ``keep`` positions of a left-padded batch (positions before a
        row's first token, padding, get zeros, which scoring never reads)."""
        rows = _unpadded(ids, mask)
        counts = [min(keep, len(r)) for r in rows]
        c = self.client
        tops = c.map(lambda a: c.next_tops(a[0], a[1], logprobs=self.k), list(zip(rows, counts)))
        out = torch.zeros(len(rows), keep, self.vocab_size, device=self.device)
        for r, (n, t) in enumerate(zip(counts, tops)):
            out[r, keep - n :] = self.rows(t)
        return out


def _unpadded(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """Each row's token ids without its left padding (a host sync)."""
    return [[t for t, m in zip(r, mr) if m] for r, mr in zip(ids.tolist(), mask.tolist())]


class RemoteRunner:
    """The rows of one batch for a :class:`RemoteModel`: each row's token ids on the host (the server keeps
    the rest: its prefix cache makes a request that repeats a prefix cheap). The methods of
    :class:`~proxytune.engine.runner.ModelRunner`, plus :meth:`start`, :meth:`draft` and :meth:`append`."""

    def __init__(self, member: RemoteModel):
        self.member = member
        self.device = member.device
        self.ids: list[list[int]] = []

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The left-padded prompts ``[B, L]``; the rows of the next position ``[B, V]``."""
        self.start(input_ids, attention_mask)
        return self.member.next_rows(self.ids)[:, 0]

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Take the left-padded prompts ``[B, L]`` without a request (the first block's request starts there)."""
        self.ids = _unpadded(input_ids, attention_mask)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ``[B]``; the rows of the next position ``[B, V]``."""
        self.append([[t] for t in tokens.tolist()])
        return self.member.next_rows(self.ids)[:, 0]

    def extend(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``n`` tokens per row ``[B, n]``; the rows after each ``[B, n, V]`` (one request per row)."""
        self.append(tokens.tolist())
        return self.member.next_rows(self.ids, tokens.shape[1])

    def append(self, tokens: Sequence[Sequence[int]]) -> None:
        """Feed each row its tokens (host lists) without a request (the server saw them in a draft)."""
        for row, new in zip(self.ids, tokens):
            row.extend(int(t) for t in new)

    def rollback(self, fed: int, kept: torch.Tensor) -> None:
        """Forget all but the first ``kept[r]`` of the last ``fed`` tokens of each row."""
        for row, k in zip(self.ids, kept.tolist()):
            del row[len(row) - fed + k :]

    def select(self, rows: torch.Tensor) -> None:
        self.ids = [self.ids[r] for r in rows.tolist()]

    def draft(self, sizes: Sequence[int], sampled: Sequence[bool], seeds: Sequence[int]):
        """One request per row: ``sizes[r]`` tokens continuing row ``r``, drawn by the server from the base
        itself (temperature 1, no filters, seed ``seeds[r]``) where ``sampled[r]``, else greedily, with the
        row of each position. Rows are not fed (:meth:`append` feeds what is kept). Returns ``(ids int64
        [B, n], lengths int64 [B] (the server may give fewer, never none), rows fp32 [B, n, V])``, ``n =
        max(sizes)``; past a row's length the ids are 0 and the rows zeros."""
        m = self.member
        done = m.client.complete_many([
            dict(prompt_ids=ids, max_tokens=n, logprobs=m.k, temperature=1.0 if s else 0.0, seed=seed if s else None,
                 extra={"ignore_eos": True})
            for ids, n, s, seed in zip(self.ids, sizes, sampled, seeds)
        ])  # fmt: skip
        b, n = len(done), max(sizes)
        ids = torch.zeros(b, n, dtype=torch.int64)
        rows = torch.zeros(b, n, m.vocab_size, device=self.device)
        lengths = []
        for r, c in enumerate(done):
            got = len(c.tokens)
            if not 1 <= got <= sizes[r]:
                raise RemoteError(f"{m.name}: asked {m.client.url} for {sizes[r]} tokens, got {got}", url=m.client.url)
            ids[r, :got] = torch.tensor(c.tokens, dtype=torch.int64)
            rows[r, :got] = m.rows(c.top)
            lengths.append(got)
        return ids.to(self.device), torch.tensor(lengths, dtype=torch.int64, device=self.device), rows
