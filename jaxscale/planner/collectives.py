"""The collectives of one layout's training step, per device, as the compiled programs hold them
(docs/plan.md, "The cost model"): parameter and gradient traffic from each parameter's stored
sharding (what `parallel/zero.py` and `data_parallel.py` gather, reduce-scatter and all-reduce),
and the activation traffic of tensor, sequence, pipeline, expert and context parallelism from the
shapes. `cost.estimate` prices them.
"""

from __future__ import annotations

import dataclasses
import math

from jaxscale.hlo import sent_bytes
from jaxscale.mesh import AXES
from jaxscale.models import DECODERS
from jaxscale.parallel import context_parallel, vocab_parallel, zero
from jaxscale.planner import remat
from jaxscale.planner.memory import (
    BATCH_AXES,
    DTYPE_BYTES,
    abstract_layout,
    in_blocks,
    leaves,
    memo,
    shapes,
    stack_of,
    tokens_per_device,
)
from jaxscale.sharding import as_tuple


@dataclasses.dataclass(frozen=True)
class Collective:
    """`count` collectives `op` per step over the mesh `axes`, whose results add up to `nbytes`."""

    op: str
    axes: tuple[str, ...]
    nbytes: float
    count: int
    what: str  # parameters | gradients | activations

    def sent(self, sizes: dict[str, int]) -> float:
        """Bytes each device sends for all of them (`jaxscale.hlo.sent_bytes`)."""
        n = math.prod(sizes[a] for a in self.axes)
        return sent_bytes(self.op, self.nbytes, frozenset([frozenset(range(n))]))


def _times(op: str, axes: tuple[str, ...], nbytes: float, count: int, what: str) -> Collective:
    """`count` collectives of `nbytes` each."""
    return Collective(op, axes, nbytes * count, count, what)


def one_f_one_b(config, sizes: dict[str, int]) -> bool:
    """Whether the step runs the 1F1B schedule, which runs each stage's forward again in the
    backward pass (`parallel/one_f_one_b.py`)."""
    return sizes["pipeline"] > 1 and config.pipeline.schedule == "1f1b"


@memo("model", "optim", "parallel", "train", "data", "pipeline")
def param_collectives(config, sizes: dict[str, int]) -> list[Collective]:
    """Parameter and gradient traffic of one step, from each parameter's stored sharding.

    A parameter split over data-parallel axes (`fsdp`, and `data` from ZeRO-2) is all-gathered
    for the forward pass (blocks again in the backward pass under ZeRO-3/FSDP) and its gradient
    reduce-scattered, once per accumulation step (gathered in `parallel.gather_dtype`, reduced
    in the parameter's own dtype); over the other batch axes (and `pipeline` for
    what every stage holds) its gradient is all-reduced; ZeRO-1 all-gathers the updated
    parameters over `data`. A pipeline stage's layers are gathered per tick (`_stage_runs`).
    """
    _, trained, _ = shapes(config)
    layout, stage = abstract_layout(config, sizes), config.parallel.zero_stage
    accum = config.train.grad_accum_steps
    gather = zero.gather_dtype(config)
    regather = zero.regathers(layout, stage)
    stored = leaves(zero.specs(layout, trained, stage, 2), trained)
    opt_split = leaves(zero.specs(layout, trained, stage, 1), trained)
    batch = [a for a in BATCH_AXES + ("context",) if sizes[a] > 1]
    groups: dict[tuple, float] = {}
    flat: dict[tuple, float] = {}  # elements per device of each flat buffer gathered
    vocab_split = _vocab_parallel(config, sizes, trained, stored)

    def add(op, axes, nbytes, count, what):  # one flat buffer per group, `count` times
        key = (op, tuple(a for a in AXES if a in axes), count, what)
        groups[key] = groups.get(key, 0.0) + nbytes

    for (path, spec, leaf), (_, opt_spec, _) in zip(stored, opt_split, strict=True):
        axes = {a for d in spec for a in as_tuple(d)}
        local = leaf.size * leaf.dtype.itemsize / math.prod(sizes[a] for a in axes)
        sent = zero.sent_dtype(leaf.dtype, gather).itemsize
        gathered = tuple(a for a in ("data", "fsdp") if a in axes and sizes[a] > 1)
        g = math.prod(sizes[a] for a in gathered)
        if gathered and "/" not in path and path in vocab_split:  # split by vocabulary, not gathered
            pass
        elif gathered:
            block = in_blocks(path)
            # gathered again in the backward pass inside the layer scan (unrolled layers keep
            # the forward's gather: XLA reuses it); a pipeline stage's, each tick
            again = regather and block and config.model.scan_layers
            layers = leaf.shape[0] // (sizes["pipeline"] if "pipeline" in axes else 1) if block else 1
            runs = _stage_runs(config, sizes) if again and "pipeline" in axes else (2 if again else 1, 1)
            ag, rs = (round(accum * r * layers) for r in runs)  # one layer's (or the rest's) each
            add("all-gather", gathered, local * g / layers * sent / leaf.dtype.itemsize, ag,
                "parameters")
            add("reduce-scatter", gathered, local / layers, rs, "gradients")
            if sizes["tensor"] == 1:  # a flat buffer per gather (`zero.gather_all`)
                part = stack_of(path) if regather and block else ""  # a layer's, or the rest's
                if not part:
                    ag, rs = (round(accum * r) for r in runs)
                key = (gathered, leaf.dtype.itemsize, sent, part, ag, rs)
                flat[key] = flat.get(key, 0.0) + local / leaf.dtype.itemsize / (layers if part else 1)
        reduce = [a for a in batch if a not in axes]
        if sizes["pipeline"] > 1 and "pipeline" not in axes:
            reduce.append("pipeline")
        if reduce:  # every accumulation step's gradients
            add("all-reduce", reduce, local, accum, "gradients")
        opt_axes = {a for d in opt_spec for a in as_tuple(d)}
        if stage == 1 and "data" in opt_axes - axes and sizes["data"] > 1:
            add("all-gather", ("data",), local, 1, "parameters")
    for (axes, itemsize, sent, _, ag, rs), elements in flat.items():  # each part padded
        pad = -round(elements) % zero.FLAT_ALIGN
        n = math.prod(sizes[a] for a in axes)
        add("all-gather", axes, pad * sent * n, ag, "parameters")
        add("reduce-scatter", axes, pad * itemsize, rs, "gradients")
    if vocab_split:  # the tokens travel instead (parallel/vocab_parallel.py)
        axes, t, d = next(iter(vocab_split.values())), tokens_per_device(config, sizes), config.model.d_model
        n = math.prod(sizes[a] for a in axes)
        add("all-gather", axes, t * n * 4, accum, "activations")  # token ids
        add("all-gather", axes, t * n * (2 * d + 2) * 4, accum, "activations")  # hidden + targets; d_rows
        add("reduce-scatter", axes, t * d * 4, 2 * accum, "activations")  # looked-up rows; d_hidden
        add("all-reduce", axes, t * n * 3 * 4, accum, "activations")  # softmax max, sum, target
    return [_times(op, axes, nbytes, count, what) for (op, axes, count, what), nbytes in groups.items()]


def layer_ticks(config, sizes: dict[str, int]) -> tuple[int, int]:
    """Ticks a pipeline stage runs per accumulation step and the layers each runs: 1 tick of all
    of a device's layers without a pipeline; GPipe `M + P - 1` forward ticks of the stage's
    `L / P`, as many backward; 1F1B `M + 2P - 2`, each with a forward and a backward;
    interleaved `V M + P - 1` of a chunk, `L / (P V)`."""
    layers, pp = config.model.n_layers // sizes["pipeline"], sizes["pipeline"]
    if pp == 1:
        return 1, layers
    m = config.pipeline.microbatches
    if config.pipeline.schedule == "1f1b":
        return m + 2 * pp - 2, layers
    v = config.pipeline.virtual_stages if config.pipeline.schedule == "interleaved" else 1
    return v * m + pp - 1, layers // v


def _stage_runs(config, sizes: dict[str, int]) -> tuple[float, float]:
    """Times per accumulation step a pipeline stage gathers each of its layers' parameters, and
    reduce-scatters its gradient, under ZeRO-3/FSDP: every tick that runs a layer gathers it
    (the compiled schedules; a tick's conditional branches counted as taken; `layer_ticks`).
    GPipe: its forward ticks and once more in the backward, a gradient per tick; 1F1B: forward,
    recomputed forward and backward in each tick; interleaved: each tick runs one chunk of the
    stage's `V`."""
    ticks, _ = layer_ticks(config, sizes)
    if config.pipeline.schedule == "1f1b":
        return 3 * ticks, ticks
    if config.pipeline.schedule == "interleaved":
        v = config.pipeline.virtual_stages
        return ticks / v, ticks / v
    return ticks + 1, ticks


def _vocab_parallel(config, sizes: dict[str, int], trained, stored) -> dict[str, tuple[str, ...]]:
    """The vocabulary tables that stay split by vocabulary under ZeRO/FSDP, and their axes: a
    decoder without a pipeline whose tokens, gathered over the axes, number at most the
    vocabulary, and whose tables no other mesh axis (`tensor`) splits by vocabulary
    (`vocab_parallel.vocab_axes`). `stored`: the parameters' stored specs (`leaves`)."""
    if config.model.family not in DECODERS or sizes["pipeline"] > 1:
        return {}
    stage = config.parallel.zero_stage
    axes = tuple(a for a in ("data", "fsdp") if sizes[a] > 1 and (a == "fsdp" or stage >= 2))
    n = math.prod(sizes[a] for a in axes)
    vocab = config.model.vocab_size
    if not axes or vocab % n or tokens_per_device(config, sizes) * n > vocab:
        return {}
    tables = vocab_parallel.vocab_tables(trained)
    specs = {path: spec for path, spec, _ in stored if path in tables}
    if any(sizes[a] > 1 and a not in axes for key, dim in tables.items()
           for a in as_tuple(specs[key][dim] if dim < len(specs[key]) else None)):
        return {}
    return dict.fromkeys(tables, axes)


def _sequence_parallel(config, sizes: dict[str, int], act: float, run_act: float, runs: int,
                       passes: int, head: tuple[float, int]) -> list[Collective]:
    """Tensor-axis traffic under sequence parallelism (`act`: one `[tokens, d_model]` activation
    of a device's micro-batch, `run_act` a microbatch's, in each of a step's `runs` of a stage's
    layers): each run of a layer gathers the sequence
    before its `passes + 2` attention and MLP inputs and scatters after its outputs and input
    gradients; the head's input (`head`: bytes, times) is gathered whole, and where the
    vocabulary-split embedding table is gathered whole its gradient is all-reduced (without a
    pipeline; in the pipelined step the stages' table gradient stays split). GPipe and the
    interleaved schedule gather the last stage's output twice and the targets once; 1F1B runs
    the head in every tick (its input gradient scattered there), gathers the embedding's output
    once and the targets twice, and all-reduces the final norm's gradient in each tick.
    XLA:CPU's compiled steps hold these (tests/test_plan.py). GPipe's backward reuses the
    forward's gathered inputs on XLA:CPU; the TPU compiler gathers them again there too (not
    priced: docs/plan.md)."""
    m, tp, pp = config.model, sizes["tensor"], sizes["pipeline"]
    accum, t = config.train.grad_accum_steps, tokens_per_device(config, sizes)
    ticks = layer_ticks(config, sizes)[0]
    table, norm, per_token = m.vocab_size * m.d_model * 4, m.d_model * 4, t * 4
    # 1F1B's recomputed stage and the interleaved schedule's checkpointed chunk keep the
    # sequence split: their backward gathers the attention's and the MLP's inputs again
    remat_stage = one_f_one_b(config, sizes) or (
        pp > 1 and config.pipeline.schedule == "interleaved" and config.pipeline.virtual_stages > 1)
    again = 2 if remat_stage else 0
    out = [_times("all-gather", ("tensor",), run_act, accum * runs * (passes + 2 + again), "activations"),
           _times("all-gather", ("tensor",), *head, "activations"),  # the head's input
           _times("reduce-scatter", ("tensor",), run_act / tp, accum * runs * (passes + 5), "activations"),
           _times("all-reduce", ("tensor",), 2 * norm, accum * runs, "gradients"),  # each run's norms
           _times("all-reduce", ("tensor",), t * 4, accum * 2, "activations")]  # softmax max, sum
    if pp == 1:
        return out + [
            _times("all-gather", ("tensor",), table, accum, "parameters"),  # the embedding table
            _times("all-reduce", ("tensor",), act + per_token, accum, "activations"),  # d_hidden
            _times("all-reduce", ("tensor",), table + norm, accum, "gradients")]  # table, final norm
    if one_f_one_b(config, sizes):
        return out + [
            _times("reduce-scatter", ("tensor",), run_act / tp, accum * ticks, "activations"),
            _times("all-gather", ("tensor",), act + 2 * per_token, accum, "activations"),
            _times("all-reduce", ("tensor",), act, accum, "activations"),
            _times("all-reduce", ("tensor",), norm, accum * ticks, "gradients")]
    return out + [
        _times("all-gather", ("tensor",), table, accum, "parameters"),
        _times("all-gather", ("tensor",), act + per_token, accum, "activations"),
        _times("all-reduce", ("tensor",), act + per_token, accum, "activations"),
        _times("all-reduce", ("tensor",), norm, accum, "gradients")]


def activation_collectives(config, sizes: dict[str, int]) -> list[Collective]:
    """Activation traffic of one step: tensor (and sequence), pipeline, expert and context
    parallelism, from the shapes (per layer what the compiled steps hold, docs/plan.md)."""
    m, b = config.model, DTYPE_BYTES[config.model.dtype]
    tp, pp, ep, cp = (sizes[a] for a in ("tensor", "pipeline", "expert", "context"))
    accum = config.train.grad_accum_steps
    t = tokens_per_device(config, sizes)
    act = t * m.d_model * b  # one [tokens, d_model] activation of a device's micro-batch
    recompute = remat.kind(config) not in ("none", "save_dots")
    out = []
    # the runs of a stage's layers and each run's activation: under a pipeline every tick runs
    # its layers on a microbatch, GPipe's and the interleaved schedule's idle ticks too, 1F1B's
    # conditional work as often as its compiled tick loop holds it (`hlo.executions`)
    mb = config.pipeline.microbatches if pp > 1 else 1
    ticks, chunk = layer_ticks(config, sizes)
    runs, run_act = ticks * chunk, act / mb
    sp = tp if config.parallel.sequence_parallel else 1
    if tp > 1:
        # forward (again when recomputed, and in 1F1B's backward ticks): wo, w_down outputs
        is_1f1b = one_f_one_b(config, sizes)
        passes = 2 + (2 if recompute else 0) + (2 if is_1f1b else 0)
        # where the loss head runs: once, or in each 1F1B tick on a microbatch
        head = (run_act, accum * ticks) if is_1f1b else (act, accum)
        if config.parallel.sequence_parallel:  # the sequence gathered before, scattered after each
            out += _sequence_parallel(config, sizes, act, run_act, runs, passes, head)  # block
        else:  # backward: the input gradients of wq, wk, wv and w_gate, w_up, each all-reduced;
            # the vocabulary-split embedding's output, the output layer's input gradient
            out += [_times("all-reduce", ("tensor",), run_act, accum * runs * (passes + 5), "activations"),
                    _times("all-reduce", ("tensor",), act, accum, "activations"),
                    _times("all-reduce", ("tensor",), *head, "activations"),
                    _times("all-reduce", ("tensor",), t * 4, accum * 2, "activations")]  # softmax max, sum
    if pp > 1:  # an activation forward and a cotangent back each tick (split by SP's sequence)
        out.append(_times("collective-permute", ("pipeline",), run_act / sp, accum * 2 * ticks,
                          "activations"))
        if config.pipeline.schedule != "1f1b":  # the embeddings' output and gradient
            out += [_times("all-reduce", ("pipeline",), act / sp, accum * 2, "activations"),
                    _times("all-reduce", ("pipeline",), t * 4, accum, "activations")]  # loss weights
    if ep > 1 and m.moe.n_experts:
        moe_layers = len(range(m.moe.first_dense, m.n_layers, m.moe.every)) // pp
        routed = act * m.moe.top_k
        # dropless: two ragged all-to-alls forward, two backward (parallel/expert_parallel.py)
        out.append(_times("all-to-all", ("expert",), routed, accum * moe_layers * 4, "activations"))
    if cp > 1:  # context parallelism's own count of its exchanges
        rows = config.train.global_batch_size // accum // math.prod(sizes[a] for a in BATCH_AXES)
        for op, (count, nbytes) in context_parallel.collective_bytes(
                config.parallel.context_attention, m, config.data.seq_len, rows, cp).items():
            out.append(Collective(op, ("context",), nbytes * accum, count * accum, "activations"))
    return out
