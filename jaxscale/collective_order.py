"""Collective ordering for XLA:CPU meshes, lowered for CPU only (see `order_collectives`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

SCOPE = "cpu_collective_order"  # the name of every operation the ordering adds


def _varying(x) -> frozenset:
    return frozenset(jax.typeof(x).manual_axis_type.varying)


def _wait(tree, deps):
    """`tree` made to wait for `deps` through a data dependency, which no pass drops. A leaf
    waits for the dependencies that vary over no manual axes it does not (so its type stays);
    float0 leaves (integers' cotangents) stay."""
    # false, NaN or not, from one element of each dependency: nothing XLA folds away
    flags = [(_varying(x), x[(0,) * x.ndim].astype(jnp.float32) * 0 > 1)
             for x in jax.tree.leaves(deps) if x.dtype != jax.dtypes.float0]

    def one(x):
        mine = [f for axes, f in flags if axes <= _varying(x)]
        if x.dtype == jax.dtypes.float0 or not mine:
            return x
        never = functools.reduce(jnp.logical_or, mine)
        return x | never if x.dtype == jnp.bool_ else x + never.astype(x.dtype)

    with jax.named_scope(SCOPE):
        return jax.tree.map(one, tree)


@jax.custom_vjp
def _ordered(first, then):
    return first, _wait(then, first)


def _ordered_fwd(first, then):
    return _ordered(first, then), None


def _ordered_bwd(_, cts):
    ct_first, ct_then = cts
    return _wait(ct_first, ct_then), ct_then


_ordered.defvjp(_ordered_fwd, _ordered_bwd)


def order_collectives(first, then):
    """`(first, then)` unchanged, but in a program lowered for CPU `then` waits for `first`, and
    in the backward pass the cotangents of `first` for those of `then`; lowered for any other
    platform nothing is added (`jax.lax.platform_dependent`), so accelerators keep the overlap.

    XLA:CPU runs a program's collectives in program order, but a loop holding some runs as one
    operation, next to any other with no path between them, and its in-process collectives tell
    collectives apart only by kind, group and channel (jax gives all of `shard_map`'s the same).
    So the emulated devices of one process can pair one device's collective in a layer loop
    with another's outside it, or in another tower's loop: the run stops, or mixes their data
    (NaN losses). Computations that hold such collectives are ordered here by a data dependency
    (XLA:CPU drops optimization barriers before it orders a program);
    `jaxscale.hlo.unordered_collectives` finds the pairs left.
    """
    return jax.lax.platform_dependent(first, then, cpu=_ordered, default=_unchanged)


def _unchanged(first, then):
    return first, then
