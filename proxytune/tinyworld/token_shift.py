"""The token-level picture (the paper's section 6.1, on the tiny world): which tokens the expert's shift moves.

For each greedy answer of the proxy-tuned large model at weight ``w``, every generated token ``x_t`` is
scored twice with the prefix the proxy-tuned model generated: under the proxy-tuned distribution
(``ProxyTuner.score`` at weight ``w``) and under the large base's (the same call at weight 0, which is the base
alone: ``s = base + 0 * (expert - anti)``). The shift of a token is ``p_proxy(x_t) - p_base(x_t)``.

Tokens are grouped by their role in the answer (:func:`token_roles`): the answer value's tokens (the value
that the first line starts with, right or wrong, of the asked attribute or of another; split into its first
token, which picks the value, and the later ones, which spell it out), the period token, the newline token,
and anything else (commas, prose such as " they said", the end-of-text token).
"""

from __future__ import annotations

import math
from typing import Sequence

from proxytune.tinyworld.world import VALUES

__all__ = ["ROLES", "answer_value", "token_roles", "token_shifts", "shift_table", "format_shift_table"]

ROLES = ("value", "value: first token", "value: later tokens", "period", "newline", "other")


def _value_span(text: str, attribute: str):
    """(start, end) of the value the first line starts with (after spaces), else None: a value of the asked
    attribute, or of another one (a wrong kind of answer still fills the answer's slot); the longest match."""
    line = text.split("\n", 1)[0]
    start = len(line) - len(line.lstrip())
    rest = line[start:]
    best = None
    for v in VALUES[attribute] + [v for a, vs in VALUES.items() if a != attribute for v in vs]:
        if rest.startswith(v) and not rest[len(v):len(v) + 1].isalnum() and (best is None or len(v) > len(best)):
            best = v
    return None if best is None else (start, start + len(best))


def answer_value(text: str, attribute: str):
    """The value the first line of ``text`` starts with (see :func:`_value_span`), or None: what an answer
    says, format aside (the base's `` Velmora, they said.`` says Velmora)."""
    span = _value_span(text, attribute)
    return None if span is None else text.split("\n", 1)[0][span[0]:span[1]]


def token_roles(pieces: Sequence[str], attribute: str) -> list[str]:
    """The role of each generated token, from its decoded text ``pieces`` (in order): ``"value: first
    token"``, ``"value: later tokens"`` (tokens overlapping the value span), ``"period"`` (a token ``"."``),
    ``"newline"`` (a token ``"\\n"``) or ``"other"``."""
    span = _value_span("".join(pieces), attribute)
    roles, at, seen_value = [], 0, False
    for piece in pieces:
        lo, hi = at, at + len(piece)
        at = hi
        if span is not None and lo < span[1] and hi > span[0] and hi > lo:
            roles.append("value: later tokens" if seen_value else "value: first token")
            seen_value = True
        elif piece == ".":
            roles.append("period")
        elif piece == "\n":
            roles.append("newline")
        else:
            roles.append("other")
    return roles


def token_shifts(tuner, questions: Sequence, token_ids: Sequence[Sequence[int]], weight: float,
                 batch_size: int = 256, progress=None) -> list[dict]:  # fmt: skip
    """One record per generated token: question index, position, id, text, role, ``p_base``, ``p_proxy``.

    ``tuner``: the proxy-tuned large model (large base + (small tuned - small base)); ``token_ids``: its greedy
    answers at ``weight`` to ``questions`` (all generated ids, the newline and end-of-text included).
    ``progress``: an object with ``update(n)`` (a tqdm bar), told after each batch of answers."""
    tokenizer = tuner.tokenizer
    keep = [i for i, ids in enumerate(token_ids) if len(ids)]
    records = []
    for start in range(0, len(keep), batch_size):
        idx = keep[start:start + batch_size]
        prompts = [questions[i].prompt for i in idx]
        conts = [list(token_ids[i]) for i in idx]
        proxy = tuner.score(prompts, conts, weights=weight, batch_size=batch_size, progress=False)
        base = tuner.score(prompts, conts, weights=0.0, batch_size=batch_size, progress=False)
        for i, sp, sb in zip(idx, proxy, base):
            if list(sp.token_ids) != list(token_ids[i]):
                raise ValueError(f"question {i}: the scorer saw other ids than the generated ones")
            pieces = [tokenizer.decode([t]) for t in token_ids[i]]
            for pos, (t, piece, role, lp, lb) in enumerate(zip(token_ids[i], pieces, token_roles(pieces, questions[i].attribute),
                                                               sp.token_logprobs, sb.token_logprobs)):  # fmt: skip
                records.append({"question": i, "position": pos, "id": int(t), "text": piece, "role": role,
                                "p_base": math.exp(lb), "p_proxy": math.exp(lp)})  # fmt: skip
        if progress is not None:
            progress.update(2 * len(idx))
    return records


def shift_table(records: Sequence[dict], correct: Sequence[int] = ()) -> dict:
    """``role -> {tokens, p_base, p_proxy, shift, shift_median, promoted}`` (means over the role's tokens;
    ``promoted``: the share of tokens whose probability rose by more than 0.5). With ``correct`` (per
    question, 0/1) also ``"value: right answers"`` and ``"value: wrong answers"``."""
    groups = {role: [] for role in ROLES}
    if correct:
        groups["value: right answers"], groups["value: wrong answers"] = [], []
    for r in records:
        groups[r["role"]].append(r)
        if r["role"].startswith("value"):
            groups["value"].append(r)
            if correct:
                groups["value: right answers" if correct[r["question"]] else "value: wrong answers"].append(r)
    table = {}
    for role, rs in groups.items():
        shifts = sorted(r["p_proxy"] - r["p_base"] for r in rs)
        n = len(rs)
        table[role] = {
            "tokens": n,
            "p_base": sum(r["p_base"] for r in rs) / n if n else None,
            "p_proxy": sum(r["p_proxy"] for r in rs) / n if n else None,
            "shift": sum(shifts) / n if n else None,
            "shift_median": (shifts[(n - 1) // 2] + shifts[n // 2]) / 2 if n else None,
            "promoted": sum(s > 0.5 for s in shifts) / n if n else None,
        }
    return table


def format_shift_table(table: dict, weight: float, n_questions: int) -> str:
    def pct(x):
        return f"{'-':>8}" if x is None else f"{100 * x:7.1f}%"

    lines = [f"token-level shift at weight {weight:g} ({n_questions} greedy answers of the proxy-tuned large model; "
             "p = probability of the generated token)",
             f"{'role':<22} {'tokens':>7} {'p base':>8} {'p proxy':>8} {'shift':>8} {'median':>8} {'>+0.5':>8}"]  # fmt: skip
    for role, row in table.items():
        lines.append(f"{role:<22} {row['tokens']:>7} {pct(row['p_base'])} {pct(row['p_proxy'])} "
                     f"{pct(row['shift'])} {pct(row['shift_median'])} {pct(row['promoted'])}")  # fmt: skip
    return "\n".join(lines)
