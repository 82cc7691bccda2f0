"""Proxy-tuned generation over Hugging Face causal LMs.

* ``tuner.py``: :class:`ProxyTuner`, the façade (loading, vocabulary checks, batching, the first token, the
  choice of decoder); ``requests.py``: what a request is and gets back (``SamplingParams``, ``TokenEvent``,
  ``Generation``, a decoding ``Row``).
* ``loop.py``: the one decode loop over a small ``Decoder`` interface; ``eager_decoder.py`` (growing
  caches, one step per launch) and ``static_decoder.py`` (chunks of the static step, or of its CUDA graphs)
  implement it.
* ``decode.py``: one model's KV cache and eager step (``ModelRunner``) and the sampler's per-row state
  (``SamplerState``); ``static_step.py``: the static step over all models; ``graph_step.py``: its CUDA
  graphs with side streams.
* ``loading.py`` model loading, ``vocabulary.py`` the shared-vocabulary check, ``prompts.py`` templates and
  left padding, ``stopping.py`` incremental detokenisation and stop strings, ``score.py`` the proxy-tuned
  log-likelihood of given continuations (``ProxyTuner.score``). transformers is imported lazily.
"""

from proxytune.engine.loading import ModelLoadError, ModelSpec
from proxytune.engine.prompts import PromptTemplate
from proxytune.engine.score import Score
from proxytune.engine.requests import Generation, SamplingParams, TokenEvent
from proxytune.engine.tuner import ProxyTuner
from proxytune.engine.vocabulary import VocabularyMismatchError

__all__ = [
    "ProxyTuner", "SamplingParams", "Generation", "TokenEvent", "ModelSpec", "PromptTemplate",
    "VocabularyMismatchError", "ModelLoadError", "Score",
]  # fmt: skip
