"""The benchmark suite (``pytest benchmarks``) and the naive baseline pipeline (:mod:`benchmarks.naive`)."""
