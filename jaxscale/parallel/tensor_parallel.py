"""Tensor parallelism (Megatron-LM) and sequence parallelism over the `tensor` mesh axis.

What it shards: attention heads (`heads`, `kv_heads`) and the MLP's hidden units (`mlp`) over
`tensor` — the first matmul of each sublayer column-parallel, the second row-parallel — and the
vocabulary (`vocab`) of the embedding and output tables. With `parallel.sequence_parallel`, the
residual stream between sublayers (`res_seq`) is split over `tensor` along the sequence too, so
norms, residual adds and the activations remat keeps are 1/T per device.

Formulation: rules only; GSPMD inserts the collectives from the parameter layouts and the models'
`constrain` calls, the same way on every backend (as in MaxText and big_vision). Writing them
out would buy nothing: each is forced by the layout, with no choice of order or fusion to make.

Collectives per layer and step (B x S tokens per data-parallel shard, width D, activation dtype
of `b` bytes): without sequence parallelism an all-reduce of the [B, S, D] sublayer output after
each row-parallel matmul, two in the forward and two in the backward (4 B S D b bytes of
payload); with it each all-reduce becomes a reduce-scatter plus an all-gather of the same total.
The vocabulary-split tables add one all-reduce of [B, S, D] for the embedding lookup and, in the
loss, all-reduces of [B, S] per softmax statistic.
"""

from __future__ import annotations

from jaxscale.sharding import Rules

AXIS = "tensor"
RULES: Rules = (
    ("vocab", AXIS),
    ("mlp", AXIS),  # column-parallel in, row-parallel out
    ("heads", AXIS),
    ("kv_heads", AXIS),
)
SEQUENCE_PARALLEL_RULES: Rules = (("res_seq", AXIS),)
