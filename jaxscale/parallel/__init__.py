"""Parallelism strategies, one module each, put together by `parallelize`.

`data_parallel` (DP), `zero` (ZeRO-1/2/3, FSDP), `vocab_parallel` (vocabulary-split tables under
ZeRO/FSDP), `tensor_parallel` (TP, sequence parallelism), `pipeline` (with the schedules in
`gpipe` and `one_f_one_b`), `expert_parallel` (EP), `context_parallel` (CP) and `diloco` (local
SGD over the data-parallel replicas). See docs/architecture.md.
"""

from jaxscale.parallel.parallelize import DEFAULT_RULES, Parallelized, make_layout, parallelize

__all__ = ["DEFAULT_RULES", "Parallelized", "make_layout", "parallelize"]
