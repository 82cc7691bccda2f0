"""Proxy-tuned generation over Hugging Face causal LMs.

* ``ensemble.py``: :class:`Ensemble`, the models in their roles (the one model order, pair weights, shared
  vocabulary, position room, templates), built once by ``Ensemble.load``; ``members.py``: what a member
  provides (:class:`~proxytune.engine.members.Member`) and the local Hugging Face model (``LocalModel``);
  ``loading.py`` model and tokenizer loading, ``vocabulary.py`` the shared-vocabulary check;
  ``remote_base.py`` a base served over HTTP (``RemoteModel``), and ``base_draft_decoder.py`` its blocks.
* ``tuner.py``: :class:`ProxyTuner`, the façade (requests, batching, prefill and the first token, the choice
  of decoder); ``requests.py``: what a request is and gets back (``SamplingParams``, ``TokenEvent``,
  ``Generation``, a decoding ``Row``); ``prompts.py`` templates and left padding, ``stopping.py`` incremental
  detokenisation and stop strings, ``score.py`` the proxy-tuned log-likelihood (``ProxyTuner.score``).
* ``loop.py``: the one decode loop (``run_decode_loop``) over a small ``Decoder`` interface, implemented by
  ``eager_decoder.py`` (growing caches, one step per launch), ``speculative_decoder.py`` (draft and verify)
  and ``static_runs.py`` (chunks of the static step, or of its CUDA graphs).
* ``runner.py``: one model's KV cache and eager forward (``ModelRunner``); ``sampler_state.py``: the sampler's
  per-row state (``SamplerState``); ``static_decoder.py``: the static step over all models
  (``StaticDecoder``); ``decode_graphs.py``: its CUDA graphs with side streams; ``decoder_pool.py``: the static
  decoder a tuner keeps between calls. transformers is imported lazily.
"""

from proxytune.engine.ensemble import Ensemble
from proxytune.engine.loading import ModelLoadError, ModelSpec
from proxytune.engine.prompts import PromptTemplate
from proxytune.engine.remote_base import RemoteModel
from proxytune.engine.score import Score
from proxytune.engine.requests import Generation, SamplingParams, TokenEvent
from proxytune.engine.tuner import ProxyTuner
from proxytune.engine.vocabulary import VocabularyMismatchError

__all__ = [
    "ProxyTuner", "Ensemble", "SamplingParams", "Generation", "TokenEvent", "ModelSpec", "PromptTemplate",
    "VocabularyMismatchError", "ModelLoadError", "Score", "RemoteModel",
]  # fmt: skip
