"""The 1F1B pipeline schedule in SPMD form, with the loss head on the last stage.

At tick `t` stage `s` runs the forward of microbatch `t - s` and the backward of microbatch
`t - (2P - 2 - s)`, for `M + 2P - 2` ticks. The last stage takes the loss of a microbatch and
starts its backward in the tick its forward ends; activations move one stage on and cotangents one
stage back per tick (two `ppermute`s). A stage keeps only the *inputs* of its in-flight
microbatches, in a ring of `min(M, 2P - 1)` slots whatever `M` is, and recomputes a microbatch's
forward in its backward (stage-level rematerialisation): activation memory is bounded by P, where
GPipe keeps every layer's activations for all `M` microbatches, at the cost of one more forward.
Forward, head and backward are each a `lax.cond`, so a stage with nothing to do in a tick skips that
work and the step costs about `(M + P - 1)(2F + B)`. With `lockstep`, every device runs a tick's
forward (backward) when any stage has one and keeps the result only where its own stage does: a
stage whose layers hold a collective that is one operation across every stage's devices (the
ring attention's collective-permutes) needs all of them to run it. The ticks take as long (in
each, the last stage has the most work), but the stages compute in their bubbles.

Gradients are computed inside the schedule, so the pipelined part is one `jax.custom_vjp`
function whose forward returns the loss and keeps the gradients, and whose backward scales them by
the loss's cotangent. The embedding, data parallelism, the optimizer and gradient accumulation
around it are unchanged.

Collectives per step, for microbatches of `A` activation bytes: per tick one `ppermute` of `A`
forward and one backward (`2 A (M + 2P - 2)` in all), and an all-reduce of the loss scalar.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxscale.parallel.stages import (
    AXIS,
    gather_stats,
    in_stack,
    loss_weight,
    run_stage,
    shapes,
    split_microbatches,
    zeros,
)


def _varying(x: jax.Array) -> frozenset[str]:
    return jax.typeof(x).manual_axis_type.varying


def _vary(x: jax.Array, axes: frozenset[str]) -> jax.Array:
    """`x` marked varying over `axes` (those it is not varying over already)."""
    missing = tuple(sorted(axes - _varying(x)))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def _head_loss(graph: nnx.GraphDef, w_shapes, h, y: jax.Array, labels) -> jax.Array:
    """The loss sum of the last stage's output `y` through the model's head (parameters `h`)."""
    return nnx.merge(graph, w_shapes, h).pipeline_loss(y, labels)


def _stats_loss(graph: nnx.GraphDef, w_shapes, h_shapes, stats):
    """What a stage's layer `stats` add to the loss sum, and their summary (`stats_loss`)."""
    return nnx.merge(graph, w_shapes, h_shapes).stats_loss(stats)


def _differentiable(a) -> bool:
    return a is not None and jnp.issubdtype(a.dtype, jnp.inexact)


class OneFOneB:
    """`loss(graphdef, params, batch, **model_kwargs) -> (loss_sum, count, stats)` under 1F1B for a model
    with the pipeline interface of `models.decoder.Decoder`, whose stacks at `paths` are split
    into stages.

    Runs where `pipeline` is manual; returns the same sums on every stage.
    """

    def __init__(self, microbatches: int, stages: int, paths: tuple[str, ...], lockstep: bool = False):
        self.m, self.p, self.paths, self.lockstep = microbatches, stages, paths, lockstep

    def __call__(self, graphdef: nnx.GraphDef, params: nnx.State, batch, **model_kwargs):
        model = nnx.merge(graphdef, params)
        x, side = model.pipeline_input(batch, **model_kwargs)
        axes = _varying(x)  # every manual axis: the table is marked varying over all of them
        graph, w, h = nnx.split(model, in_stack(self.paths), ...)
        # gradients come out of the schedule varying over every manual axis; so must the inputs
        # (parameters that gather themselves, such as an encoder's blocks under FSDP, are not yet)
        w, h = jax.tree.map(lambda a: _vary(a, axes), (w, h))
        # per-example inputs with gradients (a cross-attention model's visual context) and without
        ctx = {k: a for k, a in side.items() if _differentiable(a)}
        aux = ({k: a for k, a in side.items() if k not in ctx},
               {"targets": batch["targets"], "loss_mask": batch["loss_mask"]})
        stage_fn = functools.partial(run_stage, graph, shapes(h), model_kwargs)
        head_fn = functools.partial(_head_loss, graph, shapes(w))
        stats_fn = functools.partial(_stats_loss, graph, shapes(w), shapes(h))
        loss_sum, summary = _pipelined(stage_fn, head_fn, stats_fn, self.m, self.p,
                                       self.lockstep)(w, h, x, ctx, aux)
        return jax.lax.psum(loss_sum, AXIS), loss_weight(batch["loss_mask"]), gather_stats(summary)


def _pipelined(stage_fn: Callable, head_fn: Callable, stats_fn: Callable, m: int, p: int,
               lockstep: bool) -> Callable:
    """`f(blocks, head_params, x, ctx, aux) -> (loss_sum, summary)`: the loss sum of this stage
    (the head's on the last stage, plus its layers' router losses) and its layers' stats summary,
    with gradients by 1F1B for the blocks, the head, the stage input `x` and the context `ctx`."""

    def ticks(w, h, x, ctx, aux, with_grads):
        return _Ticks(stage_fn, head_fn, stats_fn, m, p, w, h, x, ctx, aux, with_grads=with_grads,
                      lockstep=lockstep)

    @jax.custom_vjp
    def f(w, h, x, ctx, aux):  # not differentiated: the forward ticks only
        return ticks(w, h, x, ctx, aux, False).run()[0]

    def fwd(w, h, x, ctx, aux):
        return ticks(w, h, x, ctx, aux, True).run()

    def bwd(grads, ct):
        dw, dh, dx, dctx = jax.tree.map(functools.partial(_scaled, ct[0]), grads)
        return dw, dh, dx, dctx, None

    f.defvjp(fwd, bwd)
    return f


def _zero(a: jax.Array) -> jax.Array:
    return a * 0


def _scaled(ct: jax.Array, g: jax.Array) -> jax.Array:
    return (g * ct).astype(g.dtype)


def _at(i, tree):
    return jax.tree.map(lambda a: a[i], tree)


class _Ticks:
    """One stage's run of the schedule on blocks `w`, head `h`, the stage input `x`, the context
    `ctx` and the inputs without gradients `aux = (side, labels)`.

    `run()` returns `((loss_sum, summary), (grad_blocks, grad_head, grad_x, grad_ctx))`: zero
    gradients and only the `M + P - 1` forward ticks without `with_grads`. A stage's layers
    return stats too (an MoE model's router statistics): `stats_fn` turns them into a loss sum,
    added to the loss and differentiated in the stage's backward, and a summary, summed over the
    forward ticks."""

    def __init__(self, stage_fn, head_fn, stats_fn, m, p, w, h, x, ctx, aux, *, with_grads: bool,
                 lockstep: bool):
        self.stage_fn, self.head_fn, self.stats_fn, self.m, self.p = stage_fn, head_fn, stats_fn, m, p
        self.lockstep = lockstep
        self.w, self.h, self.shape, self.with_grads = w, h, x.shape, with_grads
        split = functools.partial(split_microbatches, m=m)
        self.xs = split(x)
        self.ctxs, (self.sides, self.labels) = jax.tree.map(split, (ctx, aux))
        self.stage = jax.lax.axis_index(AXIS)
        self.slots = min(m, 2 * p - 1)
        self.zeros_x = self.xs[0] * 0
        self.zeros_w = jax.tree.map(_zero, w)  # zeros of the same type (varying over the same axes)
        self.zeros_h = jax.tree.map(_zero, h)
        self.zeros_ctx = jax.tree.map(_zero, _at(0, self.ctxs))
        self.zero_loss = jnp.sum(self.zeros_x, dtype=jnp.float32)
        self.zero_stats = zeros(jax.eval_shape(self.forward, w, self.xs[0], self.zeros_ctx, 0)[1])

    def run(self):
        zeros_x = self.zeros_x
        init = (zeros_x, zeros_x, jnp.stack([zeros_x] * self.slots), self.zeros_w, self.zeros_h,
                self.xs * 0, jax.tree.map(_zero, self.ctxs), self.zero_loss)
        ticks = self.m + 2 * self.p - 2 if self.with_grads else self.m + self.p - 1
        (_, _, _, grad_w, grad_h, grad_x, grad_ctx, loss_sum), summaries = jax.lax.scan(
            self.tick, init, jnp.arange(ticks))
        grad_ctx = jax.tree.map(lambda g: g.reshape(-1, *g.shape[2:]), grad_ctx)
        summary = jax.tree.map(lambda a: jnp.sum(a, axis=0), summaries)
        return (loss_sum, summary), (grad_w, grad_h, grad_x.reshape(self.shape), grad_ctx)

    def forward(self, w, xin, ctx, i):
        """The stage's layers on microbatch `i`'s input `xin` (and context `ctx`): the output
        and the layers' stats."""
        return self.stage_fn(w, xin, {**_at(i, self.sides), **ctx})

    def backward(self, xin, i, ct):
        """Stage backward of microbatch `i` from its stashed input: recompute, then transpose
        (the router losses with cotangent 1, as the loss sum's)."""
        (_, extra), vjp = jax.vjp(functools.partial(self._forward_of, i), self.w, xin,
                                  _at(i, self.ctxs))
        return vjp((ct, extra * 0 + 1))

    def _forward_of(self, i, w, xin, ctx):
        y, stats = self.forward(w, xin, ctx, i)
        return y, self.stats_fn(stats)[0]

    def head(self, y, i):
        """The last stage's loss sum of microbatch `i`, with its head and input gradients."""
        loss = functools.partial(self.head_fn, labels=_at(i, self.labels))
        if not self.with_grads:
            return loss(self.h, y), self.zeros_h, self.zeros_x
        lsum, vjp = jax.vjp(loss, self.h, y)
        return (lsum, *vjp(lsum * 0 + 1))

    def _kept(self, ok, tree):
        """A lockstep tick's `tree` where `ok`, zeros elsewhere (on a stage that had no work)."""
        if not self.lockstep:
            return tree
        return jax.tree.map(lambda a: jnp.where(ok, a, jnp.zeros_like(a)), tree)

    def _due(self, i):
        """Whether microbatch index `i` is one of the `M`."""
        return (i >= 0) & (i < self.m)

    def tick(self, carry, t):
        """Stage `s` at tick `t`: forward of microbatch `t - s`, backward of `t - (2P - 2 - s)`."""
        p, m, stage, zeros_x = self.p, self.m, self.stage, self.zeros_x
        recv_x, recv_ct, stash, grad_w, grad_h, grad_x, grad_ctx, loss_sum = carry
        fi, bi = t - stage, t - (2 * p - 2 - stage)
        f_ok, b_ok = self._due(fi), self._due(bi)
        f_run, b_run = f_ok, b_ok
        if self.lockstep:  # whenever any stage runs them
            every = jnp.arange(p)
            f_run, b_run = self._due(t - every).any(), self._due(t - (2 * p - 2 - every)).any()
        fi, bi = jnp.clip(fi, 0, m - 1), jnp.clip(bi, 0, m - 1)
        last = stage == p - 1
        xin = jnp.where(stage == 0, self.xs[fi], recv_x)
        y, stats = self._kept(f_ok, jax.lax.cond(
            f_run, lambda: self.forward(self.w, xin, _at(fi, self.ctxs), fi),
            lambda: (zeros_x, self.zero_stats)))
        extra, summary = self.stats_fn(stats)  # zeros for a tick without a forward
        lsum, dh, dy = jax.lax.cond(f_ok & last, lambda: self.head(y, fi),
                                    lambda: (self.zero_loss, self.zeros_h, zeros_x))
        dw, dx, dctx = self.zeros_w, zeros_x, self.zeros_ctx
        if self.with_grads:
            stash = stash.at[fi % self.slots].set(jnp.where(f_ok, xin, stash[fi % self.slots]))
            ct = jnp.where(last, dy, recv_ct)
            dw, dx, dctx = self._kept(b_ok, jax.lax.cond(
                b_run, lambda: self.backward(stash[bi % self.slots], bi, ct),
                lambda: (self.zeros_w, zeros_x, self.zeros_ctx)))
        grad_x = grad_x.at[bi].set(jnp.where(b_ok & (stage == 0), dx, grad_x[bi]))
        grad_ctx = jax.tree.map(lambda g, d: g.at[bi].add(d), grad_ctx, dctx)
        forward_ring = [(i, (i + 1) % p) for i in range(p)]
        backward_ring = [((i + 1) % p, i) for i in range(p)]
        carry = (jax.lax.ppermute(y, AXIS, forward_ring), jax.lax.ppermute(dx, AXIS, backward_ring),
                 stash, jax.tree.map(jnp.add, grad_w, dw), jax.tree.map(jnp.add, grad_h, dh),
                 grad_x, grad_ctx, loss_sum + lsum + extra)
        return carry, summary
