"""Proxy-tuned log-likelihood of given continuations (:meth:`ProxyTuner.score`): one batched forward per model.

The distribution is the one :meth:`ProxyTuner.generate` samples from at temperature 1 with no filters:
``log_softmax(s_base + sum_i w_i * (s_expert_i - s_anti_i))`` in fp32 over the common vocabulary ``V``
(``proxytune.combine``). Every model sees its prompt exactly as ``generate`` builds it (template ids spliced
around the shared prompt ids, or a conversation in a chat template) followed by the continuation's ids.

Tokenisation of a text continuation after a text prompt is lm-evaluation-harness's rule for causal models
(``TemplateLM._encode_pair``): trailing whitespace of the prompt moves to the front of the continuation;
then ``ctx = encode(prompt)`` and ``whole = encode(prompt + continuation)`` (both without special tokens) and
the continuation's ids are ``whole[len(ctx):]``, scored after ``ctx``. Where a token merges across the
boundary (``whole[:len(ctx)] != ctx``) nothing is repaired, exactly as in lm-eval: the context is still
``ctx`` and the continuation ``whole[len(ctx):]`` (which then starts after the merged token); a continuation
that merges entirely into the prompt's last token leaves no ids and is a ``ValueError``. Pass token ids to
control the split yourself. A continuation after a prompt given as ids or as a conversation is encoded on
its own; a continuation given as ids is used as is. The special tokens of the tokenizer (a BOS) belong to
the prompt, as in ``generate``; lm-eval's ids are the same for tokenizers that only prepend special tokens.

Lengths: the models are fed ``prompt + continuation[:-1]``, left-padded per batch with positions counted per
row (as ``generate``'s prefill); that must fit every model's position limit, else a ``ValueError``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import torch

from proxytune._rules import check_batch_size
from proxytune.engine.prompts import check_text, is_messages, left_pad
from proxytune.engine.runner import to_device

if TYPE_CHECKING:
    from proxytune.engine.tuner import ProxyTuner

__all__ = ["Score", "score", "split_continuation"]

Continuation = Union[str, Sequence[int]]


@dataclass
class Score:
    """One continuation's proxy-tuned log-likelihood.

    ``token_ids``: the continuation's ids as scored; ``token_logprobs``: one natural-log probability per id;
    ``logprob``: their sum; ``is_greedy``: every id is the argmax of the combined logits at its position
    (lowest index on ties), i.e. greedy decoding would produce the continuation.
    """

    token_ids: list[int]
    token_logprobs: list[float]
    logprob: float
    is_greedy: bool


def _bare(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def split_continuation(tokenizer: Any, prompt: str, continuation: str) -> tuple[str, list[int]]:
    """``(context text, continuation ids)`` by lm-eval's rule for causal models (see the module docstring):
    trailing whitespace of ``prompt`` moves to ``continuation``; the ids are ``encode(prompt + continuation)``
    past the first ``len(encode(prompt))`` ids (no special tokens)."""
    n = len(prompt) - len(prompt.rstrip())
    if n:
        prompt, continuation = prompt[:-n], prompt[-n:] + continuation
    ctx = _bare(tokenizer, prompt)
    return prompt, _bare(tokenizer, prompt + continuation)[len(ctx) :]


def _check_ids(ids: Sequence[Any], name: str, vocab_size: int) -> list[int]:
    bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, numbers.Integral)]
    if bad:
        raise TypeError(f"{name}: token ids must be integers, got {bad[0]!r}")
    out = [int(i) for i in ids]
    wrong = [i for i in out if not 0 <= i < vocab_size]
    if wrong:
        raise ValueError(f"{name} has token id {wrong[0]}, outside the common vocabulary [0, {vocab_size})")
    return out


def _continuation_ids(tuner: "ProxyTuner", i: int, prompt: Any, continuation: Continuation) -> tuple[Any, list[int]]:
    """The prompt to build per-model ids from (a text prompt loses its trailing whitespace) and the
    continuation's ids, checked."""
    name = f"continuation {i}"
    if isinstance(continuation, str):
        if not continuation:
            raise ValueError(f"{name} is empty: there is nothing to score")
        try:
            continuation.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{name} is not valid Unicode text (a lone surrogate at character {e.start})") from None
        if isinstance(prompt, str):
            check_text(prompt, f"prompt {i}")  # before the tokenizer sees it
            prompt, ids = split_continuation(tuner.tokenizer, prompt, continuation)
        else:
            ids = _bare(tuner.tokenizer, continuation)
        if not ids and not continuation.strip():
            raise ValueError(f"{name} ({continuation!r}) is whitespace only and gives no token ids after prompt {i} "
                             "(lm-eval's rule, see ProxyTuner.score): there is nothing to score")  # fmt: skip
        if not ids:
            raise ValueError(
                f"{name} ({continuation!r}) has no token ids of its own: encoding prompt {i} and it together merges it "
                "into the prompt's last token (lm-eval's rule, see ProxyTuner.score); pass token ids to split it yourself"
            )
    elif isinstance(continuation, (bytes, bytearray)) or not isinstance(continuation, Sequence):
        raise TypeError(f"{name} must be a string or a sequence of token ids, got {type(continuation).__name__}")
    else:
        if len(continuation) == 0:
            raise ValueError(f"{name} is empty: there is nothing to score")
        ids = continuation
    return prompt, _check_ids(ids, name, tuner.vocab_size)


def score(
    tuner: "ProxyTuner",
    prompts: Sequence[Any],
    continuations: Sequence[Continuation],
    *,
    weights: Union[None, float, Sequence[float]] = None,
    batch_size: Optional[int] = None,
    progress: Optional[bool] = None,
) -> Union[Score, list[Score]]:
    """See :meth:`ProxyTuner.score`."""
    single = isinstance(prompts, str) or is_messages(prompts)
    if single != isinstance(continuations, str):
        raise TypeError("give one prompt with one text continuation, or a sequence of prompts with a sequence of continuations")
    if single:
        prompts, continuations = [prompts], [continuations]
    if not isinstance(prompts, Sequence) or not isinstance(continuations, Sequence):
        raise TypeError("prompts and continuations must be sequences (lists) of equal length")
    prompts, continuations = list(prompts), list(continuations)
    if len(prompts) != len(continuations):
        raise ValueError(f"got {len(prompts)} prompts but {len(continuations)} continuations; they come in pairs")
    batch_size = check_batch_size(batch_size)
    ensemble = tuner.ensemble
    ws = ensemble.pair_weights(weights)

    requests = []  # (per-model context ids, continuation ids), checked before any model runs
    for i, (prompt, continuation) in enumerate(zip(prompts, continuations)):
        prompt, cont = _continuation_ids(tuner, i, prompt, continuation)
        _, per_model = ensemble.prompt_ids(i, prompt)
        room, m, limit = ensemble.room([len(ctx) + len(cont) - 1 for ctx in per_model])
        if room is not None and room < 0:
            ctx = per_model[ensemble.members.index(m)]
            raise ValueError(
                f"prompt {i} and continuation {i} are {len(ctx)} + {len(cont)} tokens for {m.name} (template "
                f"included); the model is fed all but the last continuation token, {len(ctx) + len(cont) - 1} "
                f"positions, but {m.name} takes at most {limit}: shorten the prompt or the continuation"
            )
        requests.append((per_model, cont))

    # longest first (as lm-eval does): less padding per batch, and a batch too large for memory fails at once
    order = sorted(range(len(requests)), key=lambda j: -max(len(c) for c in requests[j][0]) - len(requests[j][1]))
    size = batch_size or max(1, len(order))
    chunks = [order[s : s + size] for s in range(0, len(order), size)]
    show = tuner.progress if progress is None else progress
    if show and len(chunks) > 1:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="scoring", unit="batch", leave=False)
    results: list[Optional[Score]] = [None] * len(requests)
    for chunk in chunks:
        for j, s in zip(chunk, _score_batch(tuner, [requests[j] for j in chunk], ws)):
            results[j] = s
    return results[0] if single else results  # type: ignore[return-value]


@torch.inference_mode()
def _score_batch(tuner: "ProxyTuner", requests: list, weights: list[float]) -> list[Score]:
    """One forward per model over a left-padded batch; the continuation positions are the last ``C`` columns
    of every model (right-aligned continuations), whatever each model's template adds before them."""
    conts = [c for _, c in requests]
    keep = max(len(c) for c in conts)
    ensemble = tuner.ensemble
    logits = []
    for k, m in enumerate(ensemble.members):
        rows = [per_model[k] + cont[:-1] for per_model, cont in requests]
        ids, mask = left_pad(rows, ensemble.pad_token_id, m.device)
        logits.append(to_device(m.score_logits(ids, mask, keep), ensemble.device))
    b = len(requests)
    base, experts, anti_experts = ensemble.split([x.reshape(b * keep, x.shape[-1]) for x in logits])
    from proxytune.ops import combine

    s = combine(base, experts, anti_experts, weights=weights if experts else 1.0, vocab_size=ensemble.vocab_size,
                backend=tuner.backend).view(b, keep, -1)  # fmt: skip
    logprobs = s.log_softmax(-1)
    targets = torch.zeros((b, keep), dtype=torch.long)
    for r, c in enumerate(conts):
        targets[r, keep - len(c) :] = torch.tensor(c, dtype=torch.long)
    targets = targets.to(s.device)
    token_lp = logprobs.gather(-1, targets[..., None])[..., 0].tolist()
    greedy = (s.argmax(-1) == targets).tolist()
    out = []
    for r, c in enumerate(conts):
        lps = token_lp[r][keep - len(c) :]
        out.append(Score(list(c), lps, math.fsum(lps), all(greedy[r][keep - len(c) :])))
    return out
