"""proxytune: fast decoding-time proxy-tuning.

``proxytune.sample`` draws the next token from ``base + sum_i w_i * (expert_i - anti_expert_i)`` with
temperature, top-k, top-p and min-p in one op; ``proxytune.combine`` returns the combined logits.
Importing proxytune never touches a GPU and never compiles anything.
"""

from proxytune.backends import BackendUnavailableError
from proxytune.ops import combine, sample
from proxytune.engine import Ensemble, ModelSpec, ProxyTuner, RemoteModel, SamplingParams
from proxytune._cpu_backend import load_if_built as _load_cpu_op_if_built

_load_cpu_op_if_built()  # torch.ops.proxytune.* exist from import on wherever the C++ op is built (never builds)

__version__ = "0.1.0"
__all__ = ["sample", "combine", "ProxyTuner", "Ensemble", "ModelSpec", "RemoteModel", "SamplingParams", "BackendUnavailableError", "__version__"]
