"""The lm-evaluation-harness (0.4.x) model ``proxytune``: log-likelihoods from ``ProxyTuner.score``, generation
from ``ProxyTuner.generate``. Importing this module imports lm_eval and registers the model.

lm-eval 0.4 finds models only in its own registry (``lm_eval.api.registry``); it reads no entry points and
its ``--include_path`` loads task YAML, not Python (EleutherAI/lm-evaluation-harness issues #1457, #3282).
So ``lm_eval --model proxytune`` cannot find the model by itself; these do:

- ``proxytune-lm-eval ...`` (installed with proxytune; or ``python -m proxytune.integrations.lm_eval ...``):
  lm-eval's own command line with the model registered and the shipped tinyworld tasks added to
  ``--include_path``. Every ``lm_eval`` argument works, e.g.
  ``proxytune-lm-eval --model proxytune --model_args base=B,expert=E,anti_expert=A,weights=1.0 --device cpu
  --batch_size 64 --tasks tinyworld_qa``.
- Python: ``import proxytune.integrations.lm_eval`` then ``lm_eval.simple_evaluate(model="proxytune", ...)``,
  or pass ``ProxyTuneLM(...)`` itself as the model; ``TaskManager(include_path=TASKS_DIR)`` finds the tasks.

Model args: ``base=`` or ``base_url=`` (a served base, ``docs/remote.md``; with ``base_model=``,
``base_logprobs=`` (``K`` or ``all``), ``base_tail=`` (``drop``/``floor``), ``base_block=`` (``N`` or
``adaptive``), as the command line's ``--base-*`` flags), ``expert=``, ``anti_expert=`` (several pairs: ``expert=E1|E2,anti_expert=A1|A2``),
``expert_adapter=`` (LoRA adapter directories as experts, ``D1|D2``, after the ``expert=`` models; their
anti-experts follow in ``anti_expert=``, or are left out: the adapters' recorded bases; ``docs/lora.md``),
``weights=`` (one for all pairs, or ``1.0|0.5``), ``dtype=`` (float32, bfloat16, float16; default as
``ProxyTuner``), ``tokenizer=``, ``expert_template=`` (e.g. ``chat``), ``max_gen_toks=`` (default 256),
``max_length=`` (default: the smallest position limit of the models, less the longest template),
``backend=``, ``trust_remote_code=`` (``true``/``false``, also 1/0; anything else is refused, never read as
true). ``--device`` and ``--batch_size`` are lm-eval's own (``auto`` batch sizes are refused: give a number).
Values are parsed strictly, by the rules every proxytune entry point shares (``proxytune/_rules.py``: weights
finite with ``|w| <= 1e6``, a weight only with a pair to weigh); a bad one is a :class:`ProxyTuneLMError`
(a ``ValueError``) naming it, which ``proxytune-lm-eval`` prints as one line (exit status 2).

Requests, as lm-eval's ``hf`` model answers them:

- ``loglikelihood(context, continuation)``: tokenised by lm-eval's rule (``ProxyTuner.score``): trailing
  whitespace of the context moves to the continuation, and the continuation's ids are
  ``encode(context + continuation)[len(encode(context)):]``; a token merging across the boundary is not
  repaired. An empty context is the prefix token (the tokenizer's BOS, else its EOS), the continuation then
  encoded alone. Where context and continuation exceed ``max_length + 1`` tokens the context is cut from the
  left, as lm-eval's ``hf`` model does (it feeds ``(context + continuation)[-(max_length + 1):][:-1]``).
  Returns (sum of the proxy-tuned log-probabilities, whether greedy decoding gives it).
- ``loglikelihood_rolling(text)``: lm-eval's rolling windows of ``max_length`` tokens after the prefix
  token (``max_length``: the smallest position limit of the models, less the longest template).
- ``generate_until(context, gen_kwargs)``: ``until`` (cut before the first stop string; EOS also stops),
  ``max_gen_toks`` (or ``max_new_tokens``), ``do_sample`` / ``temperature`` with lm-eval's meaning (without
  ``do_sample`` a temperature above 0 samples; ``do_sample=false`` is greedy; neither: greedy), ``top_p`` (in
  ``(0, 1]``: 0 is refused, not read as 1), ``top_k``, ``min_p``, ``seed``; other keys are refused. The context
  keeps its last ``max_length - max_gen_toks`` tokens, as in lm-eval's ``hf`` model (``max_gen_toks >=
  max_length`` is an error).
"""

from __future__ import annotations

import json
import numbers
import os
import sys
from pathlib import Path
from typing import Any, Optional

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from proxytune._rules import check_batch_size, check_weight, check_weights, parse_bool
from proxytune.backends import BackendUnavailableError
from proxytune.engine.loading import check_device, parse_dtype

__all__ = ["ProxyTuneLM", "ProxyTuneLMError", "TASKS_DIR", "main"]

TASKS_DIR = str(Path(__file__).with_name("lm_eval_tasks"))
DEFAULT_MAX_LENGTH = 2048  # where no model names a position limit (lm-eval's hf model uses the same)
_GEN_KEYS = {"until", "max_gen_toks", "max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "min_p", "seed"}


class ProxyTuneLMError(ValueError):
    """A bad model arg or generation kwarg of the ``proxytune`` model (the message names it). Raised without the
    chain of the check that found it; ``proxytune-lm-eval`` prints it as one line and exits with status 2."""


class ProxyTuneLMTypeError(ProxyTuneLMError, TypeError):
    """:class:`ProxyTuneLMError` for a value of the wrong kind (also a ``TypeError``, as the rule raised it)."""


def _error(prefix: str, e: BaseException) -> ProxyTuneLMError:
    """``e`` (from a rule or from building the tuner) as a :class:`ProxyTuneLMError` prefixed by ``prefix``."""
    if isinstance(e, ProxyTuneLMError):
        return e
    return (ProxyTuneLMTypeError if isinstance(e, TypeError) else ProxyTuneLMError)(f"{prefix}: {e}")


def _split(value: Any) -> list:
    """A model arg holding one or several values: ``"a|b"``, a list, or one value."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        return [v.strip() for v in value.split("|") if v.strip()]
    return [value]


def _weight(value: Any, name: str) -> float:
    """One weight: a number, or its text (model args arrive as strings), by the one weight rule."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass  # check_weight names the argument and the rule
    return check_weight(value, name)


def _integer(value: Any, name: str, lo: int) -> int:
    """An integer >= ``lo``, or its text (``"64"``); nothing else (no bools, no ``"auto"``, no floats)."""
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def _number(value: Any, name: str) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


class ProxyTuneLM(LM):
    """lm-eval's view of a :class:`proxytune.ProxyTuner` (see the module docstring for args and requests).

    ``tuner=`` takes a ready ``ProxyTuner`` instead of ``base=`` / ``expert=`` / ``anti_expert=``.
    """

    def __init__(
        self,
        base: Any = None,
        expert: Any = None,
        anti_expert: Any = None,
        expert_adapter: Any = None,
        weights: Any = None,
        dtype: Optional[str] = None,
        device: Optional[str] = None,
        batch_size: Any = 1,
        max_batch_size: Any = None,  # lm-eval passes it; it only matters for "auto" batch sizes
        tokenizer: Optional[str] = None,
        expert_template: Optional[str] = None,
        max_gen_toks: int = 256,
        max_length: Optional[int] = None,
        backend: str = "auto",
        trust_remote_code: bool = False,
        tuner: Any = None,
        base_url: Optional[str] = None,
        base_model: Optional[str] = None,
        base_logprobs: Any = None,
        base_tail: Optional[str] = None,
        base_block: Any = None,
        **unknown: Any,
    ):
        from proxytune.remote.client import RemoteError

        super().__init__()
        served = dict(base_url=base_url, base_model=base_model, base_logprobs=base_logprobs, base_tail=base_tail,
                      base_block=base_block)  # fmt: skip
        try:
            self._init(base, expert, anti_expert, expert_adapter, weights, dtype, device, batch_size, tokenizer,
                       expert_template, max_gen_toks, max_length, backend, trust_remote_code, tuner, served, unknown)  # fmt: skip
        except BackendUnavailableError as e:
            raise ProxyTuneLMError(f"proxytune model args: backend: {e}") from None
        except RemoteError as e:  # the served base failed or refused (its URL and the server's words)
            raise ProxyTuneLMError(f"proxytune model args: base_url: {e}") from None
        except (ValueError, TypeError) as e:  # one clear error naming the argument, without the chain
            raise _error("proxytune model args", e) from None

    def _init(self, base, expert, anti_expert, expert_adapter, weights, dtype, device, batch_size, tokenizer,
              expert_template, max_gen_toks, max_length, backend, trust_remote_code, tuner, served, unknown) -> None:  # fmt: skip
        if unknown:
            raise ValueError(
                f"unknown {', '.join(sorted(unknown))}; known: base, base_url, base_model, base_logprobs, base_tail, "
                "base_block, expert, anti_expert, expert_adapter, weights, dtype, tokenizer, expert_template, "
                "max_gen_toks, max_length, backend, trust_remote_code (and lm-eval's --device, --batch_size)"
            )
        if tuner is not None and (base is not None or served["base_url"] is not None or expert is not None
                                  or anti_expert is not None or expert_adapter is not None):  # fmt: skip
            raise ValueError("give tuner= or base= / base_url= (with expert= / anti_expert= / expert_adapter=), not both")
        base = self._served_base(base, **served)
        if isinstance(batch_size, str) and batch_size.strip().isdigit():
            batch_size = int(batch_size)
        try:
            self._batch_size = check_batch_size(batch_size) or 1
        except ValueError:
            raise ValueError(f"batch_size must be a positive integer (no 'auto'), got {batch_size!r}") from None
        self.max_gen_toks = _integer(max_gen_toks, "max_gen_toks", 1)
        max_length = None if max_length is None else _integer(max_length, "max_length", 1)
        if tuner is None:
            tuner = self._build(base, expert, anti_expert, expert_adapter, weights, dtype, device, tokenizer,
                                expert_template, backend, parse_bool(trust_remote_code, "trust_remote_code"))  # fmt: skip
        self.tuner = tuner
        self._device = tuner.device
        self._max_length = max_length or self._model_max_length()

    @staticmethod
    def _served_base(base, base_url, base_model, base_logprobs, base_tail, base_block):
        """``base``, or the served base of ``base_url=`` (its options by the engine's rules; ``Ensemble.load``
        asks its server before the local models load); the ``base_*`` options only with ``base_url=``."""
        given = [k for k, v in (("base_model", base_model), ("base_logprobs", base_logprobs), ("base_tail", base_tail),
                                ("base_block", base_block)) if v is not None]  # fmt: skip
        if base_url is None:
            if given:
                raise ValueError(f"{given[0]} needs base_url= (it applies to a served base)")
            return base
        if base is not None:
            raise ValueError("give base= (a model) or base_url= (a served model), not both")
        from proxytune.engine.remote_base import RemoteModel, check_block, check_logprobs, check_tail_choice
        from proxytune.remote.client import check_url

        check_url(base_url, "base_url")
        logprobs = check_logprobs(20 if base_logprobs is None else base_logprobs, "base_logprobs")
        tail = check_tail_choice(base_tail or "drop", "base_tail")
        block = check_block(base_block, "all" if logprobs == "all" else tail, "base_block", "base_tail")
        return RemoteModel(str(base_url), base_model, logprobs=logprobs, tail=tail, block=block)

    @staticmethod
    def _build(base, expert, anti_expert, expert_adapter, weights, dtype, device, tokenizer, expert_template, backend,
               trust_remote_code):  # fmt: skip
        from proxytune.engine import ModelSpec, ProxyTuner
        from proxytune.engine.adapter_experts import pair_anti_experts

        if base is None:
            raise ValueError("base= (a model directory or hub id) or base_url= (a served model) is required")
        models, adapters = _split(expert), _split(expert_adapter)
        antis = pair_anti_experts([False] * len(models) + [True] * len(adapters), _split(anti_expert),
                                  experts_name="expert(s)", adapters_name="expert_adapter(s)",
                                  anti_name="anti_expert(s)")  # fmt: skip
        from proxytune.engine.adapters import read_adapter

        experts = [ModelSpec(e, template=expert_template) for e in models] + [  # the engine refuses an adapter's template
            ModelSpec(adapter=read_adapter(a, "expert_adapter"), template=expert_template) for a in adapters]
        ws = None
        if weights is not None:
            values = _split(weights)
            ws = check_weights([_weight(w, "weights") for w in values] if len(values) != 1 else _weight(values[0], "weights"),
                               len(experts))  # fmt: skip
        dtype = None if dtype in (None, "auto") else parse_dtype(dtype)
        return ProxyTuner(
            base, experts, antis, weights=ws, tokenizer=tokenizer,
            dtype=dtype, device=check_device(device, "device"), backend=backend, trust_remote_code=trust_remote_code,
            progress=True,
        )  # fmt: skip

    # ---------------------------------------------------------------------------------------------- properties

    def _model_max_length(self) -> int:
        """Positions a request may use: the smallest position limit, less the longest template around it."""
        ensemble = self.tuner.ensemble
        room, _, _ = ensemble.room(ensemble.template_lengths())
        return DEFAULT_MAX_LENGTH if room is None else room

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer(self):
        return self.tuner.tokenizer

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is (lm-eval's rule): the BOS token, else the EOS token."""
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "") or "proxytune").replace("/", "__")

    def chat_template(self, chat_template: Any = False) -> Optional[str]:
        return getattr(self.tokenizer, "chat_template", None) if chat_template else None

    def apply_chat_template(self, chat_history: list, add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt)

    # ---------------------------------------------------------------------------------------------- requests

    def _bare(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        from proxytune.engine.prompts import check_text, encode_prompt
        from proxytune.engine.score import split_continuation

        prompts, conts = [], []
        for n, req in enumerate(requests):
            context, continuation = req.args
            if context == "":  # lm-eval: the prefix token conditions the continuation
                ids = self._bare(continuation)
                prefix = self.prefix_token_id
                ctx, cont = (ids[:1], ids[1:]) if ids and ids[0] == prefix else ([prefix], ids)
            else:
                for name, t in (("context", context), ("continuation", continuation)):
                    if isinstance(t, str):
                        check_text(t, f"loglikelihood request {n}: {name}")
                text, cont = split_continuation(self.tokenizer, context, continuation)
                ctx = encode_prompt(self.tokenizer, text, f"request {n}")[0] if cont else []
                if not cont or len(ctx) + len(cont) - 1 <= self.max_length:
                    prompts.append(context)  # fits: score tokenises it the same way (and names any problem)
                    conts.append(continuation)
                    continue
            # lm-eval's hf model feeds (context + continuation)[-(max_length + 1):][:-1]: the context cut from the left
            room = self.max_length + 1 - len(cont)
            if cont and room < 1:
                raise ProxyTuneLMError(
                    f"proxytune: loglikelihood request {n}: the continuation alone is {len(cont)} tokens, more than "
                    f"max_length={self.max_length} positions hold after one context token"
                )
            prompts.append(self._fit(ctx, room))
            conts.append(cont)
        scores = self.tuner.score(prompts, conts, batch_size=self.batch_size, progress=not disable_tqdm)
        out = []
        for req, s in zip(requests, scores):
            result = (s.logprob, bool(s.is_greedy))
            self.cache_hook.add_partial("loglikelihood", req.args, result)
            out.append(result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for r, req in enumerate(requests):
            (text,) = req.args
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self._encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1)):  # fmt: skip
                windows.append((ctx, cont))
                owner.append(r)
        totals = [0.0] * len(requests)
        if windows:
            scores = self.tuner.score([w[0] for w in windows], [w[1] for w in windows], batch_size=self.batch_size,
                                      progress=not disable_tqdm)  # fmt: skip
            for r, s in zip(owner, scores):
                totals[r] += s.logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def _encode(self, text: str) -> list[int]:
        """lm-eval's ``hf`` tok_encode: the tokenizer's special tokens, unless the text starts with the BOS."""
        tok = self.tokenizer
        bos = tok.bos_token
        special = not (bos and text.startswith(bos))
        return list(tok(text, add_special_tokens=special)["input_ids"])

    def _sampling(self, gen_kwargs: dict):
        """``SamplingParams`` of one request's generation kwargs, with lm-eval's meaning (its
        ``normalize_gen_kwargs``): ``max_gen_toks`` before ``max_new_tokens``; without ``do_sample`` a
        temperature above 0 samples; ``do_sample=False`` is greedy whatever the temperature. Values are parsed
        strictly: a bad one is a :class:`ProxyTuneLMError` naming it (``top_p=0`` is refused, not read as 1)."""
        from proxytune.engine import SamplingParams

        try:
            if not isinstance(gen_kwargs, dict):
                raise ValueError(f"must be a dict, got {gen_kwargs!r}")
            unknown = sorted(set(gen_kwargs) - _GEN_KEYS)
            if unknown:
                raise ValueError(f"unsupported {', '.join(unknown)}; supported: {', '.join(sorted(_GEN_KEYS))}")
            until = gen_kwargs.get("until")
            until = [] if until is None else [until] if isinstance(until, str) else until
            if not isinstance(until, (list, tuple)) or not all(isinstance(u, str) for u in until):
                raise ValueError(f"until must be a string or a list of strings, got {gen_kwargs.get('until')!r}")
            key = next((k for k in ("max_gen_toks", "max_new_tokens") if gen_kwargs.get(k) is not None), None)
            n = self.max_gen_toks if key is None else _integer(gen_kwargs[key], key, 1)
            do_sample = gen_kwargs.get("do_sample")
            do_sample = None if do_sample is None else parse_bool(do_sample, "do_sample")
            given = gen_kwargs.get("temperature")
            temperature = None if given is None else _number(given, "temperature")
            if do_sample is None:
                do_sample = temperature is not None and temperature > 0
            temperature = (1.0 if temperature is None else temperature) if do_sample else 0.0

            def get(name, default, convert):
                value = gen_kwargs.get(name)
                return default if value is None else convert(value, name)

            seed = gen_kwargs.get("seed")
            seed = None if seed is None else _integer(seed, "seed", -(2**63))
            return SamplingParams(
                max_new_tokens=n, temperature=temperature, top_p=get("top_p", 1.0, _number),
                top_k=get("top_k", 0, lambda v, name: _integer(v, name, 0)), min_p=get("min_p", 0.0, _number),
                seed=seed, stop=tuple(u for u in until if u),
            ).checked(len(self.tuner.experts), "top_p/top_k/min_p/temperature")  # fmt: skip
        except (ValueError, TypeError) as e:
            raise _error("proxytune: generation kwargs", e) from None

    def _context(self, context: str, room: int):
        """A generation context as ``generate`` takes it: the text where its ids fit ``room`` positions, else
        its last ``room`` ids (lm-eval's ``hf`` model cuts contexts from the left)."""
        from proxytune.engine.prompts import encode_prompt

        if not isinstance(context, str):
            return context
        ids = encode_prompt(self.tokenizer, context, "a generate_until context")[0]
        return context if len(ids) <= room else self._fit(ids, room)

    def _fit(self, ids: list[int], room: int) -> list[int]:
        """The last ``room`` ids (lm-eval's ``hf`` model cuts contexts from the left to ``max_length``)."""
        return ids[len(ids) - room :] if len(ids) > room else ids

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[Optional[str]] = [None] * len(requests)
        bar = None
        if not disable_tqdm and len(requests) > self.batch_size:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(requests), desc="proxytune generate_until", unit="request")
        for indices in groups.values():
            params = self._sampling(requests[indices[0]].args[1])
            room = self.max_length - params.max_new_tokens  # lm-eval's hf model: the context's share of max_length
            if room < 1:
                raise ProxyTuneLMError(
                    f"proxytune: generation kwargs: max_gen_toks={params.max_new_tokens} leaves no room for a context "
                    f"in max_length={self.max_length}; give a smaller max_gen_toks or a larger max_length"
                )
            contexts = {i: self._context(requests[i].args[0], room) for i in indices}
            indices = sorted(indices, key=lambda i: -len(requests[i].args[0]))  # longest first: less padding
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                gens = self.tuner.generate([contexts[i] for i in chunk], params, batch_size=self.batch_size)
                for i, g in zip(chunk, gens):
                    out[i] = g.text
                    self.cache_hook.add_partial("generate_until", requests[i].args, g.text)
                if bar is not None:
                    bar.update(len(chunk))
        if bar is not None:
            bar.close()
        return out  # type: ignore[return-value]


if __name__ != "__main__":  # run as a script, the block at the end imports this module, which registers it
    register_model("proxytune")(ProxyTuneLM)


def _with_tasks(argv: list[str]) -> list[str]:
    """``argv`` with the shipped tasks directory added to ``--include_path`` (lm-eval's ``run``, ``ls`` and
    ``validate`` take it; the legacy form without a subcommand is ``run``)."""
    args = argv[1:]
    if not args or args[0] in ("-h", "--help") or any(a == "--include_path" or a.startswith("--include_path=") for a in args):
        return argv
    return argv + ["--include_path", TASKS_DIR]


def main() -> None:
    """``proxytune-lm-eval``: lm-eval's command line with the ``proxytune`` model registered (this module's
    import) and the shipped tinyworld tasks on ``--include_path`` (unless one is given). A bad model arg or
    generation kwarg of the ``proxytune`` model (:class:`ProxyTuneLMError`) is one line on stderr and exit
    status 2; lm-eval's own errors are lm-eval's."""
    from lm_eval.__main__ import cli_evaluate

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.argv = _with_tasks(sys.argv)
    try:
        cli_evaluate()
    except ProxyTuneLMError as e:  # a bad model arg or generation kwarg of ours: one line, as argparse's errors
        print(f"proxytune-lm-eval: error: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    from proxytune.integrations.lm_eval import main as _main  # the registered module, not this __main__ copy

    _main()
