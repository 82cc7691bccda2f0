"""proxytune: fast decoding-time proxy-tuning.

``proxytune.sample`` draws the next token from ``base + sum_i w_i * (expert_i - anti_expert_i)`` with
temperature, top-k, top-p and min-p in one op; ``proxytune.combine`` returns the combined logits.
Importing proxytune never touches a GPU.
"""

from proxytune.backends import BackendUnavailableError
from proxytune.ops import combine, sample
from proxytune.engine import ModelSpec, ProxyTuner, SamplingParams

__version__ = "0.1.0"
__all__ = ["sample", "combine", "ProxyTuner", "ModelSpec", "SamplingParams", "BackendUnavailableError", "__version__"]
