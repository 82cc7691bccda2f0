"""Proxy-tuning inside other stacks, one module per stack, each importing its stack only when imported itself
(``import proxytune`` imports none of them):

- ``proxytune.integrations.hf``: :class:`~proxytune.integrations.hf.ProxyTuningLogitsProcessor`, for a base
  model's own ``model.generate`` (Hugging Face samplers, beam search, stopping criteria).
- ``proxytune.integrations.lm_eval``: the lm-evaluation-harness model ``proxytune`` (log-likelihood from
  ``ProxyTuner.score``, generation from ``ProxyTuner.generate``) and two local tinyworld tasks.
"""
