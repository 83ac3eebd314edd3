"""The planner's cost model of one layout: memory per device (`memory.py`), collectives
(`collectives.py`), compute and step time.

Written down in docs/plan.md. In short:
- state: parameters, gradients and optimizer state per device from the abstract model's
  shardings (`jaxscale.plan`'s count), plus the parameters gathered over data-parallel axes
  (ZeRO-3/FSDP: one layer's; ZeRO-2: all, and the whole gradient);
- activations: what each layer keeps for the backward pass under the remat policy, per token,
  times the tokens the schedule holds (GPipe/interleaved: every tick's; 1F1B: its stash and
  one microbatch), one layer's backward working set and the logits' gradient;
- collectives: parameter and gradient traffic from each parameter's stored sharding (what
  `parallel/zero.py` and `data_parallel.py` gather, reduce-scatter and all-reduce), activation
  traffic of tensor, sequence, pipeline, expert and context parallelism from the shapes;
- time: FLOPs (with what the remat policy computes again, `remat.py`) over the chip's achievable
  rate, stretched by the pipeline bubble; parameter and gradient traffic, and an offload policy's
  host transfers, overlap compute (only what exceeds it shows), activation traffic does not.
"""

from __future__ import annotations

import dataclasses
import math

from jaxscale.mesh import AXES
from jaxscale.metrics import train_flops_per_token
from jaxscale.planner import remat
from jaxscale.planner.clusters import Cluster
from jaxscale.planner.collectives import (
    Collective,
    activation_collectives,
    layer_ticks,
    one_f_one_b,
    param_collectives,
)
from jaxscale.planner.memory import (
    DTYPE_BYTES,
    activation_bytes,
    gathered_bytes,
    host_bytes,
    state_bytes,
    tokens_per_device,
)


@dataclasses.dataclass(frozen=True)
class Estimate:
    """What `estimate` predicts for one layout; times in seconds, bytes per device."""

    sizes: dict[str, int]
    state_bytes: float
    activation_bytes: float
    memory_bytes: float
    collectives: tuple[Collective, ...]
    compute_s: float
    bubble: float
    comm_s: dict[str, float]  # per link class: fast | slow | host (an offload policy's transfers)
    exposed_comm_s: float
    step_s: float
    tokens_per_s_per_chip: float
    mfu: float
    host_memory_bytes: float = 0.0  # an offload policy's activations in host memory at once


def link(axes: tuple[str, ...], sizes: dict[str, int], cluster: Cluster) -> tuple[str, float]:
    """The link class a collective over `axes` crosses and the bytes/s one chip gets on it.

    Mesh axes are laid out outermost first (`jaxscale.mesh.AXES`, `tensor` innermost), so a group
    stays inside one fast domain when the devices from its outermost axis inwards fit in one.
    """
    span = math.prod(sizes[a] for a in AXES[min(AXES.index(a) for a in axes):])
    if span > cluster.fast_domain:
        return "slow", cluster.slow_bw
    chip = cluster.chip
    if not chip.torus_dims:
        return "fast", chip.fast_bw
    group = math.prod(sizes[a] for a in axes)
    side = round(cluster.fast_domain ** (1 / chip.torus_dims))
    dims = min(chip.torus_dims, max(1, math.ceil(math.log(group) / math.log(max(side, 2)) - 1e-9)))
    return "fast", chip.fast_bw * dims


# Elementwise passes over HBM per layer of training, by remat policy: the forward's, the
# backward's (about twice the forward's) and the forward's again where the policy recomputes it
# (`save_dots` recomputes all but the matmuls, `full` everything)
PASSES = {"none": 3.0, "save_dots": 4.0, "full": 4.0}


def hbm_bytes(config, sizes: dict[str, int]) -> float:
    """Bytes one device moves through HBM per step outside the matmuls (which the compute
    fraction prices): per layer and token the norms, residual adds, rotary embedding, flash
    attention's inputs and output, the gated MLP's product (in `model.dtype`), per token the
    float32 logits and their gradient, and the optimizer's pass over its state. 1F1B's
    recomputed stage forward is one pass more."""
    m, b = config.model, DTYPE_BYTES[config.model.dtype]
    tp = sizes["tensor"]
    d = m.d_model / (tp if config.parallel.sequence_parallel else 1)
    q, kv, f = m.n_heads * m.head_dim / tp, m.n_kv_heads * m.head_dim / tp, m.d_ff / tp
    per_token = (10 * d + 4 * q + 4 * kv + 3 * f) * b  # one forward pass of one layer
    passes = PASSES.get(remat.kind(config), PASSES["full"]) + float(one_f_one_b(config, sizes))
    layers = m.n_layers // sizes["pipeline"]
    tokens = tokens_per_device(config, sizes) * config.train.grad_accum_steps
    logits = 3 * m.vocab_size / tp * 4  # written, read by the softmax, gradient written
    state = state_bytes(config, sizes)
    optimizer = 2 * (state["params"] + state["optimizer"]) + state["grads"]  # one update
    return tokens * (layers * passes * per_token + logits) + optimizer


def hidden_excess(busy: float, overlapped: float) -> float:
    """What overlapped communication adds to a step busy computing for `busy` seconds."""
    return max(0.0, overlapped - busy)


def overlap_class(c: Collective) -> str:
    """What a collective carries, as `estimate`'s `overlapped` names it: `parameters` (parameter
    gathers and gradient reductions), `tensor` or `pipeline` (activations over that axis alone),
    or `activations` (the rest)."""
    if c.what != "activations":
        return "parameters"
    return c.axes[0] if c.axes in (("tensor",), ("pipeline",)) else "activations"


def conditional_share(config, sizes: dict[str, int]) -> float:
    """The share of its tensor-parallel traffic a step's time carries: 1F1B's tick loop holds
    each tick's forward, head and backward in conditionals, which the bytes count as taken in
    all `M + 2P - 2` ticks; a stage runs them in `M`, and the step's critical path spans
    `M + P - 1` ticks of them (as its compute: the bubble). 1 for the other schedules, whose
    idle ticks compute too."""
    if not one_f_one_b(config, sizes):
        return 1.0
    return (config.pipeline.microbatches + sizes["pipeline"] - 1) / layer_ticks(config, sizes)[0]


def estimate(config, sizes: dict[str, int], cluster: Cluster,
             overlapped: tuple[str, ...] = ("parameters",)) -> Estimate:
    """Memory, collectives and step time of `config` (its mesh resolved to `sizes`) on `cluster`.

    Collectives of the `overlapped` classes (`overlap_class`) run alongside compute, so only what
    exceeds it shows; the rest wait. jaxscale overlaps parameter traffic (XLA's asynchronous
    collectives); frameworks that split TP's matmuls to overlap their collectives add `tensor`."""
    state = sum(state_bytes(config, sizes).values())
    acts = activation_bytes(config, sizes) + gathered_bytes(config, sizes)
    colls = tuple(param_collectives(config, sizes) + activation_collectives(config, sizes))
    chips = math.prod(sizes.values())
    tokens = config.train.global_batch_size * config.data.seq_len
    model_flops = train_flops_per_token(config) * tokens / chips
    again = remat.recompute_flops_per_token(config, one_f_one_b(config, sizes))
    flops = model_flops + again * tokens / chips
    compute = (flops / (cluster.chip.peak_flops * cluster.chip.compute_fraction)
               + hbm_bytes(config, sizes) / cluster.chip.hbm_bw)
    pp, schedule = sizes["pipeline"], config.pipeline.schedule
    bubble = 0.0
    if pp > 1:
        v = config.pipeline.virtual_stages if schedule == "interleaved" else 1
        bubble = (pp - 1) / (v * config.pipeline.microbatches + pp - 1)
    busy = compute / (1 - bubble)
    # an offload policy's activations out to the host and back, beside the compute (its own link)
    host = host_bytes(config, sizes)
    comm = {"fast": 0.0, "slow": 0.0, "host": 2 * host / cluster.chip.host_bw}
    hidden = exposed = 0.0
    ticked = conditional_share(config, sizes)
    for c in colls:
        kind, bw = link(c.axes, sizes, cluster)
        what = overlap_class(c)
        seconds = c.sent(sizes) / bw * (ticked if what == "tensor" else 1.0)
        comm[kind] += seconds
        if what in overlapped:
            hidden += seconds
        else:
            exposed += seconds
    exposed += hidden_excess(busy, hidden) + hidden_excess(busy, comm["host"])
    step = busy + exposed
    return Estimate(sizes, state, acts, state + acts, colls, compute, bubble, comm, exposed, step,
                    tokens / step / chips, model_flops / step / cluster.chip.peak_flops,
                    host / config.train.grad_accum_steps)
