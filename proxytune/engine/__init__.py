"""Proxy-tuned generation over Hugging Face causal LMs.

``tuner.py`` holds :class:`ProxyTuner` (the generation loops), ``decode.py`` one model's KV cache and decode
step (eager), ``static_step.py`` the static decode step over all models (static caches and buffers),
``graph_step.py`` its CUDA graphs with side streams, ``loading.py`` model loading, ``vocabulary.py`` the shared-vocabulary check, ``prompts.py`` templates and
left padding, ``stopping.py`` incremental detokenisation and stop strings, ``score.py`` the
proxy-tuned log-likelihood of given continuations (``ProxyTuner.score``). transformers is imported lazily.
"""

from proxytune.engine.loading import ModelLoadError, ModelSpec
from proxytune.engine.prompts import PromptTemplate
from proxytune.engine.score import Score
from proxytune.engine.tuner import Generation, ProxyTuner, SamplingParams, TokenEvent
from proxytune.engine.vocabulary import VocabularyMismatchError

__all__ = [
    "ProxyTuner", "SamplingParams", "Generation", "TokenEvent", "ModelSpec", "PromptTemplate",
    "VocabularyMismatchError", "ModelLoadError", "Score",
]  # fmt: skip
