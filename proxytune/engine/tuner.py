"""``ProxyTuner``: proxy-tuned text generation with a base model and (expert, anti-expert, weight) pairs."""

from __future__ import annotations

import numbers
from dataclasses import fields, replace
from typing import Any, Iterator, Optional, Sequence, Union

import torch

from proxytune._rules import check_batch_size
from proxytune.engine.base_draft_decoder import BaseDraftDecoder
from proxytune.engine.decoder_pool import DecoderPool, DecoderStats
from proxytune.engine.eager_decoder import EagerDecoder
from proxytune.engine.ensemble import Ensemble
from proxytune.engine.loop import emit, run_decode_loop
from proxytune.engine.prompts import left_pad
from proxytune.engine.requests import Generation, Prompt, Row, SamplingParams, TokenEvent, is_single
from proxytune.engine.sampler_state import SamplerState
from proxytune.engine.speculative_decoder import SpeculativeDecoder
from proxytune.engine.stopping import RowText

__all__ = ["ProxyTuner", "SamplingParams", "Generation", "TokenEvent"]

class ProxyTuner:
    """Generate text from ``base + sum_i w_i * (expert_i - anti_expert_i)``, all Hugging Face causal LMs.

    Parameters
    ----------
    base : hub id, local directory, ``PreTrainedModel``, :class:`ModelSpec`, a served model
        (:class:`~proxytune.engine.remote_base.RemoteModel`: a server's top-k log-probs, ``docs/remote.md``),
        or an :class:`Ensemble`
        The (large) model to steer; an :class:`~proxytune.engine.ensemble.Ensemble` (built by
        :meth:`Ensemble.load <proxytune.engine.ensemble.Ensemble.load>`) brings the pairs, weights and tokenizer
        with it, and the model arguments below are then not given. Everything about the models (their roles
        and order, the shared vocabulary, position limits, templates, weights) is :attr:`ensemble`'s.
    experts, anti_experts : one or a sequence of the same kinds, pairwise
        The tuned small models and their untuned counterparts. Empty: the base alone.
    weights : float or sequence of floats
        ``w_i`` per pair (``alpha`` in the paper), default 1.0; requests may override it. One number for every
        pair or one per pair, each finite with ``|w| <= 1e6`` (``docs/semantics.md``); a weight without a pair
        to weigh is an error.
    tokenizer : tokenizer, hub id or directory, optional
        The shared tokenizer. Default: the base's. Every model's own tokenizer (where one can be found) must
        give the same tokens for the same ids over the common vocabulary, else
        :class:`~proxytune.engine.vocabulary.VocabularyMismatchError`.
    dtype, device : default for every model without its own in a :class:`ModelSpec`
        ``dtype`` default: float32 on CPU, bfloat16 elsewhere (for loaded paths; model objects keep theirs).
        ``device`` default: CUDA if available, else CPU; a model object stays on its device unless one is
        given (it is moved in place). Sampling runs on the base's device.
    eos_token_ids : ids that end a row; default the shared tokenizer's EOS plus every model's
        ``generation_config.eos_token_id``.
    trust_remote_code : bool
        Passed to transformers; off by default. Checkpoints load from safetensors only.
    backend : the ``proxytune.sample`` backend (``"auto"``).
    progress : show a progress bar while loading and over many prompts.
    decode : ``"auto"``, ``"eager"``, ``"static"`` or ``"graph"``
        How the decode steps run. ``"eager"``: a growing ``DynamicCache`` per model, finished rows dropped at
        once, one host sync per token. ``"static"``: the static step of ``engine/static_decoder.py`` (static KV
        caches and input buffers, per-row parameters in device tensors, rows in batch-size buckets, the host
        reading the drawn tokens every ``poll_every`` steps), run eagerly. ``"graph"``: the same step captured
        in a CUDA graph per bucket, the small models on side streams (CUDA only; not yet verified on a GPU by
        this project's tests). ``"auto"``: ``"eager"`` everywhere until a GPU run has verified the graph path
        (:attr:`decode_reason` says why; on CUDA with models the static step supports it names
        ``decode="graph"`` as the opt-in). An explicit ``"static"``
        or ``"graph"`` the models cannot use raises ``ValueError``. All modes give the same tokens for the
        same seeds (up to the last bits of the logits: the static step attends over a masked, preallocated
        cache).
    poll_every : decode steps between two reads of the drawn tokens by the host (static and graph modes);
        streamed tokens then arrive in groups of up to this many. The static decoder (caches sized for the
        largest batch seen so far, grown as requests need) and its graphs are kept between calls:
        :meth:`release_decode_buffers` frees them.
    speculative_tokens : int
        0 (default): off. ``k >= 1``: speculative decoding (``docs/speculative.md``): the first expert drafts
        up to ``k`` tokens per round, the base and the other models score them in one forward each, and the
        standard accept/reject rule keeps the output distribution exactly the plain engine's (greedy: the same
        ids). Runs in the eager decoder (``decode`` must be ``"auto"`` or ``"eager"``); needs at least one
        pair. ``generate``/``stream`` may override it per call.
    speculative_adaptive : bool
        True (default): each row's draft length follows its acceptance (all drafts accepted: +2, else -1,
        between 1 and ``speculative_tokens``). False: always ``speculative_tokens`` drafts (fewer only where
        the row's budget ends).
    """

    def __init__(
        self,
        base: Any,
        experts: Any = (),
        anti_experts: Any = (),
        *,
        weights: Union[None, float, Sequence[float]] = None,
        tokenizer: Any = None,
        dtype: Union[torch.dtype, str, None] = None,
        device: Union[str, torch.device, None] = None,
        eos_token_ids: Optional[Sequence[int]] = None,
        trust_remote_code: bool = False,
        backend: str = "auto",
        progress: bool = False,
        decode: str = "auto",
        poll_every: int = 8,
        speculative_tokens: int = 0,
        speculative_adaptive: bool = True,
    ):
        if isinstance(base, Ensemble):
            given = dict(experts=experts, anti_experts=anti_experts, weights=weights, tokenizer=tokenizer, dtype=dtype,
                         device=device, eos_token_ids=eos_token_ids)  # fmt: skip
            extra = [k for k, v in given.items() if v is not None and not (isinstance(v, (list, tuple)) and not v)]
            if extra:
                raise ValueError(f"an Ensemble holds the models already; {', '.join(extra)} cannot be given with it")
            self.ensemble = base
        else:
            self.ensemble = Ensemble.load(base, experts, anti_experts, weights=weights, tokenizer=tokenizer, dtype=dtype,
                                          device=device, eos_token_ids=eos_token_ids,
                                          trust_remote_code=trust_remote_code, progress=progress)  # fmt: skip
        self.eos_token_ids = self.ensemble.eos_token_ids  # the ids that end a row (a generation policy: settable)
        self.backend = backend
        self.progress = progress
        if backend != "auto":  # an unknown name fails now, not at the first token
            from proxytune import backends

            backends.resolve(backend, self.device)
        if not isinstance(poll_every, int) or isinstance(poll_every, bool) or poll_every < 1:
            raise ValueError(f"poll_every must be a positive integer, got {poll_every!r}")
        self.poll_every = poll_every
        self.decode_requested = decode
        self.decode, self.decode_reason = self._resolve_decode(decode)
        self.speculative_tokens = self._check_speculative(speculative_tokens)
        if not isinstance(speculative_adaptive, bool):
            raise ValueError(f"speculative_adaptive must be True or False, got {speculative_adaptive!r}")
        self.speculative_adaptive = speculative_adaptive
        self.graph_variant = "auto"  # "streams", "sequential" or "auto" (the faster by measurement, per bucket)
        self._pool: Optional[DecoderPool] = None  # the static decoder and its graphs, kept between batches

    # the ensemble's parts, as the tuner has always named them
    base = property(lambda self: self.ensemble.base)
    experts = property(lambda self: self.ensemble.experts)
    anti_experts = property(lambda self: self.ensemble.anti_experts)
    models = property(lambda self: self.ensemble.members, doc="The members in the model order (base, experts, anti-experts).")
    weights = property(lambda self: self.ensemble.weights)
    tokenizer = property(lambda self: self.ensemble.tokenizer)
    vocab_size = property(lambda self: self.ensemble.vocab_size)
    pad_token_id = property(lambda self: self.ensemble.pad_token_id)
    device = property(lambda self: self.ensemble.device)

    def _check_speculative(self, k: Any) -> int:
        """``k`` as a checked draft length (0: off): an integer >= 0, and > 0 only with a pair to draft and a
        decode mode that can speculate (the one rule for the constructor and every call)."""
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
            raise ValueError(f"speculative_tokens must be an integer >= 0, got {k!r}")
        if k > 0 and not self.experts:
            raise ValueError(f"speculative_tokens={k} needs an (expert, anti-expert) pair: the first expert drafts")
        if k > 0 and self.decode_requested in ("static", "graph"):
            raise ValueError(f"speculative_tokens={k} runs in the eager decoder; decode={self.decode_requested!r} "
                             "cannot speculate: pass decode='auto' or 'eager'")  # fmt: skip
        return int(k)

    def release_decode_buffers(self) -> None:
        """Drop the static decoder's caches and buffers and its CUDA graphs (rebuilt by the next call)."""
        if self._pool is not None:
            self._pool.release()

    def decoder_stats(self) -> Optional[DecoderStats]:
        """What the static decoder kept between calls holds (rows, positions, whether a request holds it, its
        CUDA graphs); None when there is none (eager modes, or after :meth:`release_decode_buffers`)."""
        return self._pool.stats() if self._pool is not None else None

    def _resolve_decode(self, decode: str) -> tuple[str, Optional[str]]:
        """The decode mode to use and, when ``"auto"`` chose eager, why."""
        from proxytune._verified import GPU_VERIFIED
        from proxytune.engine.static_decoder import static_support

        if decode not in ("auto", "eager", "static", "graph"):
            raise ValueError(f"decode must be 'auto', 'eager', 'static' or 'graph', got {decode!r}")
        if decode == "eager":
            return "eager", None
        eager_only = next((m.eager_only for m in self.models if m.eager_only is not None), None)
        reason, caveat = (eager_only, None) if eager_only is not None else \
            static_support([m.module for m in self.models], [m.name for m in self.models])  # fmt: skip
        cuda = self.device.type == "cuda"
        if decode == "auto":
            if reason is None and caveat is None and cuda:
                if GPU_VERIFIED:
                    return "graph", None
                # auto picks only what a GPU run has verified (proxytune/_verified.py); opt in with "graph"
                return "eager", "the CUDA-graph step is not yet verified on a GPU; pass decode='graph' to use it"
            return "eager", reason or caveat or f"CUDA graphs need a CUDA device; the models are on {self.device}"
        if reason is not None:
            raise ValueError(f"decode={decode!r} is not possible: {reason}")
        if decode == "graph" and not cuda:
            raise ValueError(f"decode='graph' needs a CUDA device; the models are on {self.device}")
        if caveat is not None:
            import warnings

            warnings.warn(f"decode={decode!r}: {caveat}", stacklevel=3)
        return decode, None

    def __repr__(self) -> str:
        return "ProxyTuner" + repr(self.ensemble)[len("Ensemble"):]

    # ------------------------------------------------------------------------------------------ public API

    def generate(
        self,
        prompts: Union[Prompt, Sequence[Prompt]],
        params: Union[None, SamplingParams, Sequence[SamplingParams]] = None,
        *,
        return_logprobs: bool = False,
        batch_size: Optional[int] = None,
        use_cache: bool = True,
        speculative_tokens: Optional[int] = None,
        **overrides: Any,
    ) -> Union[Generation, list[Generation]]:
        """Generate a completion for each prompt.

        Parameters
        ----------
        prompts : str, list of token ids, a conversation, or a sequence of those
            A single prompt returns a single :class:`Generation`, a sequence returns a list. A conversation
            is a list of ``{"role": ..., "content": ...}`` messages: a model with template ``"chat"`` sees it
            in its chat template (multi-turn), every other model the contents, one per line.
        params : SamplingParams, or one per prompt
            Default ``SamplingParams()``; keyword ``overrides`` (``max_new_tokens=``, ``temperature=``, ...)
            replace fields for every prompt.
        return_logprobs : bool
            Also return each token's log-probability under the filtered, renormalised distribution
            (0 for greedy rows).
        batch_size : int, optional
            At most this many prompts run together (default: all).
        use_cache : bool
            False recomputes every model over the whole sequence each step (for testing; slow; no speculation).
        speculative_tokens : int, optional
            This call's draft length (0: no speculation); default the tuner's ``speculative_tokens``.
        """
        single = is_single(prompts)
        batch = [prompts] if single else list(prompts)
        results: list[Optional[Generation]] = [None] * len(batch)
        texts = [[] for _ in batch]
        for event, row in self._events(batch, params, return_logprobs, batch_size, use_cache, overrides,
                                       speculative_tokens):  # fmt: skip
            texts[event.index].append(event.text)
            if event.finish_reason is not None:
                results[event.index] = Generation(
                    row.prompt, "".join(texts[event.index]), row.ids, event.finish_reason, row.seed,
                    row.logprobs if return_logprobs else None,
                )  # fmt: skip
        return results[0] if single else results  # type: ignore[return-value]

    def score(
        self,
        prompts: Union[Prompt, Sequence[Prompt]],
        continuations: Union[str, Sequence[Union[str, Sequence[int]]]],
        *,
        weights: Union[None, float, Sequence[float]] = None,
        batch_size: Optional[int] = None,
        progress: Optional[bool] = None,
    ):
        """The proxy-tuned log-likelihood of each continuation after its prompt (``engine/score.py``).

        Log-probabilities under ``softmax(s_base + sum_i w_i * (s_expert_i - s_anti_i))`` at temperature 1,
        no filters, over the common vocabulary, in fp32: one batched forward per model (no token loop), each
        model seeing its prompt as :meth:`generate` builds it (templates, conversations) and then the
        continuation's ids.

        Parameters
        ----------
        prompts : as for :meth:`generate` (one, or a sequence)
        continuations : str or token ids, one per prompt
            A text continuation after a text prompt is tokenised by lm-evaluation-harness's rule: trailing
            whitespace of the prompt moves to the continuation, and its ids are ``encode(prompt +
            continuation)[len(encode(prompt)):]`` (no special tokens). A token that merges across the boundary
            is not repaired (as in lm-eval: the continuation's ids start after it; one that leaves no ids is a
            ``ValueError``). After a prompt given as ids or a conversation the continuation is encoded alone;
            ids are used as given.
        weights : None (the tuner's), a float for every pair, or one float per pair
        batch_size : at most this many requests per forward (default: all); longest requests go first
        progress : a progress bar over batches (default: the tuner's ``progress``)

        Returns
        -------
        list of :class:`~proxytune.engine.score.Score` (``token_ids``, ``token_logprobs``, ``logprob``,
        ``is_greedy``); a single one for one text prompt with one text continuation.

        Raises ``ValueError`` naming the request for an empty continuation, one that does not fit a model's
        positions (all but its last token are fed after the prompt), ids outside the common vocabulary and
        lists of different lengths.
        """
        from proxytune.engine.score import score

        return score(self, prompts, continuations, weights=weights, batch_size=batch_size, progress=progress)

    def stream(
        self,
        prompts: Union[Prompt, Sequence[Prompt]],
        params: Union[None, SamplingParams, Sequence[SamplingParams]] = None,
        *,
        return_logprobs: bool = False,
        batch_size: Optional[int] = None,
        speculative_tokens: Optional[int] = None,
        **overrides: Any,
    ) -> Iterator[TokenEvent]:
        """Like :meth:`generate`, but yield a :class:`TokenEvent` for every token as soon as it is drawn (with
        speculation: a round's accepted tokens as soon as the round has decided them)."""
        single = is_single(prompts)
        batch = [prompts] if single else list(prompts)
        for event, _ in self._events(batch, params, return_logprobs, batch_size, True, overrides, speculative_tokens):
            yield event

    # ------------------------------------------------------------------------------------------ the loop

    def _events(self, prompts, params, return_logprobs, batch_size, use_cache, overrides, speculative_tokens=None):
        speculative = self._check_speculative(self.speculative_tokens if speculative_tokens is None else speculative_tokens)
        if isinstance(params, SamplingParams) or params is None:
            params = [params or SamplingParams()] * len(prompts)
        params = list(params)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        n_pairs = self.ensemble.n_pairs
        unknown = sorted(set(overrides) - {f.name for f in fields(SamplingParams)})
        if unknown:
            names = ", ".join(f.name for f in fields(SamplingParams))
            raise TypeError(f"unknown sampling parameter(s) {', '.join(unknown)}; SamplingParams has {names}")
        params = [replace(p, **overrides).checked(n_pairs, f"request {i}") for i, p in enumerate(params)]
        size = check_batch_size(batch_size) or max(1, len(prompts))
        starts = list(range(0, len(prompts), size))
        bar = None
        if self.progress and len(starts) > 1:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(prompts), desc="generating", unit="prompt", leave=False)
        for start in starts:
            chunk = range(start, min(start + size, len(prompts)))
            yield from self._run_batch([(i, prompts[i], params[i]) for i in chunk], return_logprobs, use_cache,
                                       speculative)  # fmt: skip
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()

    def _room(self, index: int, per_model: list[list[int]]) -> Optional[int]:
        """How many new tokens fit the models' position limits after this prompt (None: no limit). A prompt
        that leaves no room is an error up front, not a crash mid-generation."""
        room, m, limit = self.ensemble.room([len(ids) for ids in per_model])
        if room is not None and room <= 0:
            used = len(per_model[self.models.index(m)])
            raise ValueError(
                f"prompt {index} is {used} tokens for {m.name} (template included), but {m.name} takes at "
                f"most {limit} positions, prompt and new tokens together: shorten the prompt"
            )
        return room

    def _run_batch(self, requests, return_logprobs: bool, use_cache: bool, speculative: int = 0):
        """Yield ``(TokenEvent, Row)`` for every token of every request in this batch: prefill, the first token,
        then the decode loop (:func:`proxytune.engine.loop.run_decode_loop`) over this tuner's decoder (the
        speculative one with ``speculative`` drafts, when there is a cache). A served base that drafts blocks
        draws the first tokens too: its decoder starts at the prompt (no one-token request first)."""
        rows, inputs = [], []
        for index, prompt, p in requests:
            context, per_model = self.ensemble.prompt_ids(index, prompt)
            room = self._room(index, per_model) if p.max_new_tokens > 0 else None
            budget = p.max_new_tokens if room is None else min(p.max_new_tokens, room)
            rows.append(Row.start(index, prompt, p, RowText(self.tokenizer, context, p.stop), budget))
            inputs.append(per_model)
        for r in rows:
            if r.params.max_new_tokens == 0:
                yield TokenEvent(r.index, None, "", None, "length"), r
        live = [j for j, r in enumerate(rows) if r.params.max_new_tokens > 0]
        if not live:
            return
        rows, inputs = [rows[j] for j in live], [inputs[j] for j in live]
        runners = [m.runner(use_cache) for m in self.models]
        padded = [left_pad([x[k] for x in inputs], self.pad_token_id, r.device) for k, r in enumerate(runners)]
        state = SamplerState.for_requests([r.params for r in rows], [r.seed for r in rows], self.weights, self.device)
        kw = dict(vocab_size=self.vocab_size, backend=self.backend, return_logprobs=return_logprobs)
        if use_cache and speculative == 0 and getattr(self.base, "drafts_blocks", False):
            # a served base drafts from the prompt on (its first request draws the first tokens), the small models verify
            runners[0].start(*padded[0])
            small = [r.prefill(*x) for r, x in zip(runners[1:], padded[1:])]
            decoder = BaseDraftDecoder(runners, state, small, budgets=[r.budget for r in rows], block=self.base.block, **kw)
            yield from run_decode_loop(decoder, rows, self.eos_token_ids, set())
            return
        logits = [runner.prefill(*x) for runner, x in zip(runners, padded)]
        tokens, logprobs = state.sample(logits, vocab_size=self.vocab_size, backend=self.backend,
                                        return_logprobs=return_logprobs, validate=True)  # fmt: skip
        state.step += 1
        finished: set[int] = set()
        first = ([tokens.tolist()], [logprobs.tolist()] if logprobs is not None else None)
        yield from emit(rows, lambda: first, self.eos_token_ids, finished)
        if len(finished) == len(rows):
            return
        if use_cache and speculative > 0:
            decoder = SpeculativeDecoder(runners, state, tokens, budgets=[r.budget - 1 for r in rows],
                                         draft_tokens=speculative, adaptive=self.speculative_adaptive, **kw)  # fmt: skip
        elif not use_cache or self.decode == "eager":
            decoder = EagerDecoder(runners, state, tokens, **kw)
        else:
            yield from self._static_pool().run(rows, runners, state, tokens, finished, pad_token_id=self.pad_token_id,
                                               eos_token_ids=self.eos_token_ids, graphs=self.decode == "graph",
                                               return_logprobs=return_logprobs)  # fmt: skip
            return
        yield from run_decode_loop(decoder, rows, self.eos_token_ids, finished)

    def _static_pool(self) -> DecoderPool:
        """The kept static decoder's pool, made anew when the settings it was made with have changed."""
        pool = self._pool
        if pool is None or (pool.backend, pool.poll_every, pool.graph_variant) != (self.backend, self.poll_every,
                                                                                    self.graph_variant):  # fmt: skip
            pool = self._pool = DecoderPool(
                [m.module for m in self.models], [m.name for m in self.models], vocab_size=self.vocab_size,
                backend=self.backend, poll_every=self.poll_every, graph_variant=self.graph_variant,
            )  # fmt: skip
        return pool
