"""Which GPU code paths have run on a real GPU: ``auto`` picks only verified ones (one policy for both).

The fused Triton kernel and the CUDA-graph decode step are written and tested on CPU (the kernel in triton's
interpreter and compiled ahead of time for sm_80 / sm_90; the graph step's logic on the static path), but
until a GPU run of ``scripts/gpu_check.sh`` passes and its results file is committed under
``benchmarks/results/``, ``backend="auto"`` on CUDA tensors takes ``reference`` and ``decode="auto"`` takes
``eager``. Both can be asked for by name (``backend="triton"``, ``decode="graph"``). The README says the same.
"""

GPU_VERIFIED = False  # set True in the commit that adds a passing scripts/gpu_check.sh results file
