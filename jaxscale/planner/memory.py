"""What one device holds at the peak of a training step, as the planner prices it (docs/plan.md):
parameters, gradients and optimizer state from the abstract model's shardings, the parameters
gathered over data-parallel axes (ZeRO-3/FSDP: one layer's; ZeRO-2: all, and the whole
gradient), and the activations each layer keeps for the backward pass under the remat policy,
times the tokens the pipeline schedule holds, with one layer's backward working set and the
logits' gradient. `cost.estimate` adds the collectives and time.
"""

from __future__ import annotations

import functools
import math

import jax
from jax.sharding import AbstractMesh, AxisType, PartitionSpec

from jaxscale.mesh import AXES
from jaxscale.models import abstract_model
from jaxscale.parallel import make_layout, zero
from jaxscale.planner import remat
from jaxscale.sharding import as_tuple, bytes_per_device
from jaxscale.train import lora
from jaxscale.train.optim import make_optimizer

BATCH_AXES = ("data", "fsdp", "expert")  # the axes a step's rows are split over
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


_SHAPES: dict[str, tuple] = {}


def shapes(config):
    """Abstract parameters, trained parameters and optimizer state of the config's model (each
    model and optimizer computed once)."""
    key = config.model.to_json() + config.optim.to_json() + str(config.train.steps)
    if key not in _SHAPES:
        _, params = abstract_model(config.model)
        trained = lora.split(params)[0] if lora.enabled(config.model) else params
        tx, _ = make_optimizer(config.optim, config.train.steps)
        _SHAPES[key] = (params, trained, jax.eval_shape(tx.init, trained))
    return _SHAPES[key]


def abstract_layout(config, sizes: dict[str, int]):
    mesh = AbstractMesh(tuple(sizes[a] for a in AXES), AXES, axis_types=(AxisType.Auto,) * len(AXES))
    return make_layout(config, mesh)


def leaves(specs, tree) -> list[tuple[str, PartitionSpec, jax.ShapeDtypeStruct]]:
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [("/".join(str(k.key) for k in path if getattr(k, "key", ".value") != ".value"), spec, leaf)
            for (path, leaf), spec in zip(flat, flat_specs, strict=True)]


def memo(*sections: str):
    """Cache `fn(config, sizes)` on the config `sections` it reads and the sizes (the search asks
    for the same layouts' state and collectives many times over)."""

    def wrap(fn):
        cache: dict[str, object] = {}

        def cached(config, sizes: dict[str, int]):
            key = "".join(config[s].to_json() for s in sections) + str(sorted(sizes.items()))
            if key not in cache:
                cache[key] = fn(config, sizes)
            return cache[key]

        return functools.wraps(fn)(cached)

    return wrap


@memo("model", "optim", "parallel", "train")
def state_bytes(config, sizes: dict[str, int]) -> dict[str, float]:
    """Per-device bytes of parameters, gradients and optimizer state (as `jaxscale info`)."""
    params, trained, opt = shapes(config)
    layout, stage = abstract_layout(config, sizes), config.parallel.zero_stage
    return {"params": bytes_per_device(zero.specs(layout, params, stage, 2), params, sizes),
            "grads": bytes_per_device(zero.specs(layout, trained, stage, 2), trained, sizes),
            "optimizer": bytes_per_device(zero.specs(layout, opt, stage, 1), opt, sizes)}


def tokens_per_device(config, sizes: dict[str, int]) -> float:
    """Tokens of one micro-batch (one accumulation step) that one device's batch shard holds."""
    rows = config.train.global_batch_size / config.train.grad_accum_steps
    return rows / math.prod(sizes[a] for a in BATCH_AXES) * config.data.seq_len / sizes["context"]


def stack_of(path: str) -> str:
    """The stack of blocks (`blocks`, `first_blocks`, ...) a parameter path lies in, or ""."""
    keys = path.split("/")
    i = zero.stack_index(keys)
    return "" if i is None else "/".join(keys[:i + 1])


def in_blocks(path: str) -> bool:
    """Whether a parameter path lies in a stack of blocks."""
    return bool(stack_of(path))


# What a layer's backward pass holds beside the stash, per token, in `remat`'s units (the scores
# are `attention_scores_bytes`'): activation gradients and the matmuls' operands (XLA:CPU's DP
# step: 6 d_model, 2 d_ff, 1 head-width); under tensor parallelism without sequence parallelism
# also the input gradients of wq, wk, wv, w_gate and w_up, whole and all-reduced together.
BACKWARD = (6.0, 2.0, 1.0, 0.0)
TP_REDUCED = 5.0
# Of the score units a layer's stash holds (`remat.KEPT`, measured with XLA's "dot_product"), the
# share each attention kind keeps: "einsum"'s hand-written backward saves only the float32
# probabilities (XLA:CPU, the default model: 4,677 against 5,717 float32 per token and layer,
# one score unit of 1,024 less), the flash kernels none
STASHED_SCORES = {"dot_product": 1.0, "einsum": 0.5, "cudnn": 0.0, "splash": 0.0}


def _per_token(config, sizes: dict[str, int], units, whole: float) -> float:
    """Bytes per token of a device's micro-batch of (d_model, d_ff, head-width, scores) `units`,
    split by tensor parallelism; d_model by sequence parallelism but for `whole` of its units."""
    m, b, tp = config.model, DTYPE_BYTES[config.model.dtype], sizes["tensor"]
    if not (config.parallel.sequence_parallel and tp > 1):
        whole = units[0]
    d = (units[0] - whole) * m.d_model / tp + whole * m.d_model
    f, o = m.d_ff / tp, m.n_heads * m.head_dim / tp
    scores = m.n_heads / tp * config.data.seq_len / sizes["context"]
    return b * (d + units[1] * f + units[2] * o + units[3] * scores)


def layer_bytes(config, sizes: dict[str, int], recomputed: bool = False) -> float:
    """Bytes one layer keeps per token of a device's micro-batch under the config's remat policy
    (`remat.kept`, `_per_token`); with `recomputed`, what its backward pass rebuilds beyond them
    (the units "none" keeps over the policy's; the scores are `attention_scores_bytes`')."""
    kept, whole = remat.kept(config)
    if recomputed:
        none = remat.KEPT["none"]
        kept = tuple(max(0.0, n - k) for n, k in zip(none[:3], kept, strict=False)) + (0.0,)
        whole = max(0.0, remat.SP_GATHERED["none"] - whole)
    kept = kept[:3] + (kept[3] * STASHED_SCORES[config.model.attention],)
    return _per_token(config, sizes, kept, whole)


def backward_bytes(config, sizes: dict[str, int]) -> float:
    """Bytes per token a layer's backward pass holds beside the stash and the scores
    (`BACKWARD`, and `TP_REDUCED` whole d_model units under tensor parallelism without sequence
    parallelism)."""
    units = BACKWARD
    if sizes["tensor"] > 1 and not config.parallel.sequence_parallel:
        units = (units[0] + TP_REDUCED,) + units[1:]
    return _per_token(config, sizes, units, BACKWARD[0])


def activation_bytes(config, sizes: dict[str, int]) -> float:
    """Bytes one device keeps for the backward pass at the peak: its layers' saved activations
    (by remat policy) for the tokens the schedule holds, one layer's backward (what it rebuilds,
    `backward_bytes`, its scores) on a microbatch, and the logits' gradient.

    Without a pipeline: every layer, the device's micro-batch. GPipe and interleaved keep every
    tick's: `V M + P - 1` ticks of `L / (P V)` layers on a microbatch; where a tick runs more
    than one layer, its layer scan's backward holds its residuals copied out of the stash and
    its own gradient of the stage's layers; the interleaved schedule's checkpoint around a chunk
    (`gpipe.CircularSchedule`) saves the chunk's gathered parameters (ZeRO-3/FSDP) each tick.
    1F1B keeps the inputs of its in-flight microbatches (`min(M, 2P - 1)` slots) and recomputes
    a stage's forward in the backward: one microbatch's layers; its head runs per microbatch."""
    m = config.model
    pp, t = sizes["pipeline"], tokens_per_device(config, sizes)
    layers = m.n_layers // pp
    per_layer = layer_bytes(config, sizes)
    layer_tokens, micro, head_tokens, extra = layers * t, t, t, 0.0
    if pp > 1:
        mb, v = config.pipeline.microbatches, config.pipeline.virtual_stages
        micro = t / mb
        if config.pipeline.schedule == "1f1b":
            slots = min(mb, 2 * pp - 1)
            layer_tokens, head_tokens = layers * micro, micro
            # the stash; a tick's stage gradient and the zeros a tick without a backward adds
            extra = (slots * micro * m.d_model * DTYPE_BYTES[m.dtype] / _sp(config, sizes)
                     + 2 * state_bytes(config, sizes)["grads"])
            if zero.regathers(abstract_layout(config, sizes), config.parallel.zero_stage):
                parts = _gathered_parts(config, sizes)
                extra += parts[1] + parts[3]  # the head's tables, their gradients
        else:
            v = v if config.pipeline.schedule == "interleaved" else 1
            ticks, chunk = v * mb + pp - 1, layers // v
            layer_tokens = ticks * chunk * micro
            if chunk > 1:
                extra = chunk * micro * per_layer + _block_grads(config, sizes)
            if v > 1 and zero.regathers(abstract_layout(config, sizes), config.parallel.zero_stage):
                extra += ticks * chunk * _gathered_parts(config, sizes)[0] / layers
    logit_tokens = min(head_tokens, m.loss_chunk) if m.loss_chunk else head_tokens
    logits = logit_tokens * m.vocab_size / sizes["tensor"] * 4
    working = (micro * (layer_bytes(config, sizes, recomputed=True) + backward_bytes(config, sizes))
               + attention_scores_bytes(config, sizes, micro))
    if _sp(config, sizes) > 1:  # the vocabulary-split embedding table gathered whole, and its gradient
        extra += 2 * m.vocab_size * m.d_model * 4
    return layer_tokens * per_layer + logits + working + extra


def host_bytes(config, sizes: dict[str, int]) -> float:
    """Bytes one device's layers send to host memory in a step under an `offload:` policy
    (`remat.offloaded`), all its micro-batches'; each comes back once for the backward pass."""
    layers = config.model.n_layers // sizes["pipeline"]
    tokens = tokens_per_device(config, sizes) * config.train.grad_accum_steps
    return layers * tokens * _per_token(config, sizes, remat.offloaded(config), 0.0)


# float32 copies of a layer's attention scores live while its backward pass runs, where XLA
# writes the attention (scores, probabilities, their gradient; not all at once): measured on TPU
# v5p at Llama-3.1-8B widths, seq 8192 (docs/plan.md). Flash attention (cuDNN, splash) keeps none.
SCORE_COPIES = 2.5


def attention_scores_bytes(config, sizes: dict[str, int], tokens: float) -> float:
    """Bytes of one layer's materialised attention scores for `tokens` of a device's rows while
    the layer's backward runs: `SCORE_COPIES` float32 [heads, seq, seq] per row; 0 for the flash
    kernels (cuDNN, splash)."""
    m = config.model
    if m.attention in ("cudnn", "splash"):
        return 0.0
    scores_per_token = m.n_heads / sizes["tensor"] * config.data.seq_len / sizes["context"]
    return SCORE_COPIES * 4 * tokens * scores_per_token


def _sp(config, sizes: dict[str, int]) -> int:
    return sizes["tensor"] if config.parallel.sequence_parallel else 1


@memo("model", "optim", "parallel", "train")
def _block_grads(config, sizes: dict[str, int]) -> float:
    """Per-device bytes of the gradient of the stacks of blocks."""
    _, trained, _ = shapes(config)
    layout = abstract_layout(config, sizes)
    return sum(leaf.size * leaf.dtype.itemsize / math.prod(sizes[a] for d in spec for a in as_tuple(d))
               for path, spec, leaf in leaves(zero.specs(layout, trained, config.parallel.zero_stage, 2),
                                               trained) if in_blocks(path))


@memo("model", "parallel")
def _gathered_parts(config, sizes: dict[str, int]) -> tuple[float, float, float, float]:
    """Bytes of the parameters split over data-parallel axes, gathered (in `parallel.gather_dtype`,
    split by the model-parallel axes alone): those in stacks of blocks, and the rest; then the
    same parameters' whole gradients (float32) before their reduce-scatter."""
    params, _, _ = shapes(config)
    layout, gather = abstract_layout(config, sizes), zero.gather_dtype(config)
    parts = [0.0] * 4
    for path, spec, leaf in leaves(zero.specs(layout, params, config.parallel.zero_stage, 2), params):
        axes = {a for d in spec for a in as_tuple(d)}
        if not {"data", "fsdp"} & {a for a in axes if sizes[a] > 1}:
            continue
        whole = leaf.size / math.prod(sizes[a] for a in axes if a not in ("data", "fsdp"))
        rest = not in_blocks(path)
        parts[rest] += whole * zero.sent_dtype(leaf.dtype, gather).itemsize
        parts[2 + rest] += whole * leaf.dtype.itemsize
    return tuple(parts)


@memo("model", "parallel")
def gathered_bytes(config, sizes: dict[str, int]) -> float:
    """Parameters a device holds gathered over the data-parallel axes at its peak (`_gathered_parts`):
    under ZeRO-3/FSDP one layer's, next to its gradient before the reduce-scatter; under ZeRO-2
    all of them, gathered once before the forward pass and kept to the end of the backward pass,
    where the whole gradient is reduce-scattered."""
    stage = config.parallel.zero_stage
    regather = zero.regathers(abstract_layout(config, sizes), stage)
    if not regather and stage < 2:
        return 0.0
    block, rest, block_grad, rest_grad = _gathered_parts(config, sizes)
    if regather:
        return (block + block_grad) / (config.model.n_layers // sizes["pipeline"]) / sizes["pipeline"]
    return block + rest + block_grad + rest_grad
