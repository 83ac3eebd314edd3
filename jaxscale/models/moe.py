"""Mixture of experts: a router sends each token to `top_k` of `n_experts` SwiGLU experts.

Routers: "softmax" (Mixtral: softmax over the experts, the top k, renormalised with
`normalize_top_k`) and "sigmoid" (DeepSeek-V3: sigmoid scores, the top k normalised, times
`route_scale`). With `bias_rate > 0` a per-expert bias, added to the scores only to choose the
experts, is moved once per optimizer step toward balance (DeepSeek-V3's auxiliary-loss-free
balancing, `balance_bias`); it is state, not a trained parameter (`RouterBias`).

Dispatch: "dropless" sorts the token-expert assignments by expert and runs every expert on its
own tokens with grouped matmuls (`jax.lax.ragged_dot`); "capacity" gives each expert
`ceil(capacity_factor * seq * top_k / n_experts)` slots per row and drops the assignments beyond
them, in the order of all first choices (by position), then all second choices, and so on, into
static [experts, slots, embed] buffers. How the experts' rows reach the devices that hold the
experts is the business of an `ExpertShards` a parallelism strategy hands the layer
(`expert_shards`); without one every expert is local.

Losses, per row (sequence), so that they do not depend on how the batch is split across devices,
micro-batches or pipeline stages: the load-balancing loss `E / (k S) sum_e c_e P_e` (Switch /
GShard form; c_e assignments to expert e in the row, P_e its mean router probability, 1 when
balanced) and the router z-loss `mean_t logsumexp(logits_t)^2` (ST-MoE). Each MoE layer returns
them with its load as sums over its tokens (`Stats`: a row's balancing loss counted once per
token, so that a sum over tokens divided by their number is the mean over rows), for the model to
weight by `aux_coef` and `z_coef` (`router_losses`). Each MoE layer adds its own: the total is the
sum over layers (Switch, Megatron), not one loss pooled over them (Hugging Face's Mixtral).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Protocol

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxscale.errors import UserError
from jaxscale.models.attention import row_mean
from jaxscale.models.layers import dense, param
from jaxscale.sharding import constrain

ROUTERS = ("softmax", "sigmoid")
DISPATCH = ("dropless", "capacity")
Stats = dict[str, jax.Array]  # per layer: "aux", "z", "dropped", "tokens" (sums), "load" [experts]


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """The config's `model.moe` section; `n_experts=0` is a dense model."""

    n_experts: int = 0
    top_k: int = 2
    d_ff: int = 0  # each expert's hidden size
    shared_d_ff: int = 0  # hidden size of the shared experts (DeepSeek), one SwiGLU; 0: none
    first_dense: int = 0  # the first layers keep a dense MLP
    every: int = 1  # after them, every `every`-th layer is an MoE layer (the rest dense)
    router: str = "softmax"
    normalize_top_k: bool = True
    route_scale: float = 1.0
    bias_rate: float = 0.0  # aux-loss-free balancing: bias step per optimizer step; 0: off
    aux_coef: float = 0.01
    z_coef: float = 0.001
    dispatch: str = "dropless"
    capacity_factor: float = 1.25

    def check(self, n_layers: int) -> None:
        """Clear errors for settings that cannot work (an MoE model: `n_experts > 0`)."""
        if self.n_experts < 0:
            raise UserError(f"model.moe.n_experts={self.n_experts} must be 0 (dense) or positive")
        if not self.n_experts:
            return
        if not 1 <= self.top_k <= self.n_experts:
            raise UserError(f"model.moe.top_k={self.top_k} must be between 1 and "
                            f"model.moe.n_experts={self.n_experts}")
        if self.d_ff < 1 or self.shared_d_ff < 0:
            raise UserError(f"model.moe.d_ff={self.d_ff} must be positive (and shared_d_ff="
                            f"{self.shared_d_ff} at least 0)")
        if self.first_dense < 0 or self.every < 1 or (n_layers - self.first_dense) < self.every or (
                (n_layers - self.first_dense) % self.every):
            raise UserError(f"model.moe.first_dense={self.first_dense} and every={self.every} must "
                            f"leave model.n_layers={n_layers} - first_dense layers, a positive "
                            f"multiple of every")
        if self.router not in ROUTERS:
            raise UserError(f"model.moe.router={self.router!r}; use {' or '.join(ROUTERS)}")
        if self.dispatch not in DISPATCH:
            raise UserError(f"model.moe.dispatch={self.dispatch!r}; use {' or '.join(DISPATCH)}")
        if self.dispatch == "capacity" and not self.capacity_factor > 0:
            raise UserError(f"model.moe.capacity_factor={self.capacity_factor} must be > 0 "
                            f"(or use model.moe.dispatch=dropless)")
        for key in ("aux_coef", "z_coef", "bias_rate", "route_scale"):
            if not getattr(self, key) >= 0:
                raise UserError(f"model.moe.{key}={getattr(self, key)} must be >= 0")

    def moe_layers(self, n_layers: int) -> int:
        return (n_layers - self.first_dense) // self.every if self.n_experts else 0

    def capacity(self, seq_len: int) -> int:
        """Slots per expert and row under capacity dispatch."""
        return math.ceil(self.capacity_factor * seq_len * self.top_k / self.n_experts)


class RouterBias(nnx.Variable):
    """The router's balancing bias: state that `balance_bias` moves, not a trained parameter."""


class ExpertShards(Protocol):
    """How the experts' rows reach the devices holding the experts, when a parallelism strategy
    splits the experts across devices (`jaxscale.parallel.expert_parallel`, which holds the
    collectives). Both take and return this device's rows; `apply` runs this device's experts."""

    def ragged(self, rows: jax.Array, sizes: jax.Array,
               apply: Callable[[jax.Array, jax.Array], jax.Array]) -> tuple[jax.Array, jax.Array]:
        """`rows` [M, embed] sorted by expert, `sizes` [experts] rows per expert; `apply(rows,
        sizes)` on rows sorted by this device's experts and their sizes. Returns the rows'
        outputs (zeros for rows dropped on the way) and how many were dropped."""
        ...

    def buffers(self, slots: jax.Array, apply: Callable[[jax.Array], jax.Array]) -> jax.Array:
        """`slots` [experts, M, embed]; `apply` on this device's experts' [local, M', embed]."""
        ...


_SHARDS: contextvars.ContextVar[ExpertShards | None] = contextvars.ContextVar("experts", default=None)


@contextlib.contextmanager
def expert_shards(shards: ExpertShards | None) -> Iterator[None]:
    """Run the MoE layers traced inside this block with the experts split as `shards` says."""
    token = _SHARDS.set(shards)
    try:
        yield
    finally:
        _SHARDS.reset(token)


class Experts(nnx.Module):
    """`n_experts` SwiGLU MLPs, their weights stacked on a leading `experts` axis."""

    def __init__(self, d_model: int, c: MoEConfig, n_layers: int, rngs: nnx.Rngs):
        e, f = c.n_experts, c.d_ff
        std, out_std = d_model**-0.5, f**-0.5 / math.sqrt(2 * n_layers)
        self.w_gate = param(rngs, (e, d_model, f), ("experts", "embed", "mlp"), std)
        self.w_up = param(rngs, (e, d_model, f), ("experts", "embed", "mlp"), std)
        self.w_down = param(rngs, (e, f, d_model), ("experts", "mlp", "embed"), out_std)

    def ragged(self, rows: jax.Array, sizes: jax.Array) -> jax.Array:
        """Rows [M, embed] sorted by expert, `sizes[e]` of them for expert e (rows past their
        sum come out as zeros)."""
        dt = rows.dtype
        gate = jax.lax.ragged_dot(rows, self.w_gate[...].astype(dt), sizes)
        up = jax.lax.ragged_dot(rows, self.w_up[...].astype(dt), sizes)
        h = checkpoint_name(jax.nn.silu(gate) * up, "mlp_hidden")
        return jax.lax.ragged_dot(h, self.w_down[...].astype(dt), sizes)

    def batched(self, slots: jax.Array) -> jax.Array:
        """Each expert on its own slots [experts, M, embed]."""
        dt = slots.dtype
        gate = jnp.einsum("emd,edf->emf", slots, self.w_gate[...].astype(dt))
        up = jnp.einsum("emd,edf->emf", slots, self.w_up[...].astype(dt))
        h = checkpoint_name(jax.nn.silu(gate) * up, "mlp_hidden")
        return jnp.einsum("emf,efd->emd", h, self.w_down[...].astype(dt))


class LocalExperts:
    """Every expert on this device (no expert parallelism)."""

    def ragged(self, rows, sizes, apply):
        return apply(rows, sizes), jnp.zeros((), jnp.int32)

    def buffers(self, slots, apply):
        return apply(slots)


class MoE(nnx.Module):
    """Router, experts and optional shared experts (`shared`, a dense MLP every token goes
    through). `__call__(x)` returns the output and the layer's `Stats`."""

    def __init__(self, d_model: int, c: MoEConfig, n_layers: int, rngs: nnx.Rngs,
                 shared: nnx.Module | None = None):
        self.c = c
        self.router = param(rngs, (d_model, c.n_experts), ("embed", None), d_model**-0.5)
        self.bias = RouterBias(jnp.zeros((c.n_experts,), jnp.float32), logical_axes=(None,))
        self.experts = Experts(d_model, c, n_layers, rngs)
        self.shared = shared

    def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """For x [batch, seq, embed]: the chosen experts and their weights [batch, seq, k], the
        router probabilities P [batch, seq, experts] of the balancing loss, and the logits'
        log-sum-exp [batch, seq] (float32)."""
        c = self.c
        logits = dense(x.astype(jnp.float32), self.router[...])
        if c.router == "softmax":
            probs = jax.nn.softmax(logits, axis=-1)
            scores = probs
        else:
            scores = jax.nn.sigmoid(logits)
            probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
        _, ids = jax.lax.top_k(jax.lax.stop_gradient(scores) + self.bias[...], c.top_k)
        weights = jnp.take_along_axis(scores, ids, axis=-1)
        if c.normalize_top_k:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        return ids, weights * c.route_scale, probs, jax.nn.logsumexp(logits, axis=-1)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, Stats]:
        c = self.c
        b, s, d = x.shape
        ids, weights, probs, lse = self.route(x)
        shards = _SHARDS.get() or LocalExperts()
        if c.dispatch == "dropless":
            out, dropped = self._dropless(x.reshape(b * s, d), ids.reshape(b * s, -1), shards)
        else:
            out, dropped = self._capacity(x, ids, shards)
        out = jnp.einsum("bskd,bsk->bsd", out.reshape(b, s, c.top_k, d), weights.astype(x.dtype))
        if self.shared is not None:
            out = out + self.shared(x)
        counts = jnp.sum(jax.nn.one_hot(ids, c.n_experts, dtype=jnp.float32), axis=2)  # [b, s, e]
        row_counts = jnp.sum(jax.lax.stop_gradient(counts), axis=1)  # [b, e]
        aux = c.n_experts / c.top_k * jnp.sum(row_counts * row_mean(probs))
        stats = {"aux": aux, "z": jnp.sum(jnp.square(lse)), "load": jnp.sum(row_counts, axis=0),
                 "dropped": jnp.asarray(dropped, jnp.float32),  # by capacity or a capped exchange
                 "tokens": jnp.asarray(b * s, jnp.float32)}
        return constrain(out, ("batch", "seq", "embed")), stats

    def _dropless(self, x: jax.Array, ids: jax.Array,
                  shards: ExpertShards) -> tuple[jax.Array, jax.Array]:
        """x [N, embed], ids [N, k] -> each assignment's expert output [N * k, embed], and the
        number dropped (by a capped expert-parallel exchange; none otherwise)."""
        flat = ids.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        rows = jnp.take(x, order // ids.shape[1], axis=0)
        sizes = jnp.bincount(flat, length=self.c.n_experts).astype(jnp.int32)
        out, dropped = shards.ragged(rows, sizes, self.experts.ragged)
        return jnp.zeros_like(out).at[order].set(out, unique_indices=True), dropped

    def _capacity(self, x: jax.Array, ids: jax.Array,
                  shards: ExpertShards) -> tuple[jax.Array, jax.Array]:
        """x [b, s, embed], ids [b, s, k] -> each assignment's expert output [b, s, k, embed]
        (zeros where dropped) and the number dropped."""
        b, s, d = x.shape
        k, e, cap = self.c.top_k, self.c.n_experts, self.c.capacity(s)
        order = jnp.swapaxes(ids, 1, 2).reshape(b, k * s)  # first choices first, by position
        onehot = jax.nn.one_hot(order, e, dtype=jnp.int32)
        slot = jnp.sum((jnp.cumsum(onehot, axis=1) - 1) * onehot, axis=-1)  # [b, k s]
        slot = jnp.swapaxes(slot.reshape(b, k, s), 1, 2)  # [b, s, k]
        kept = slot < cap
        bi = jnp.broadcast_to(jnp.arange(b)[:, None, None], ids.shape)
        where = (ids, bi, jnp.where(kept, slot, cap))  # out of range: dropped
        xs = jnp.broadcast_to(x[:, :, None], (b, s, k, d))
        slots = jnp.zeros((e, b, cap, d), x.dtype).at[where].set(xs, mode="drop")
        out = shards.buffers(slots.reshape(e, b * cap, d), self.experts.batched)
        out = out.reshape(e, b, cap, d).at[where].get(mode="fill", fill_value=0)
        return out, jnp.sum(~kept).astype(jnp.float32)


def balance_bias(params, load: jax.Array, rate: float):
    """`params` with every `RouterBias` [layers, experts] moved by `rate` toward balance:
    `b_e += rate * sign(mean load - load_e)` for `load` [layers, experts] (a step's assignments
    per layer and expert); DeepSeek-V3's update, once per optimizer step."""
    def move(leaf):
        if not isinstance(leaf, RouterBias):
            return leaf
        step = rate * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)
        return leaf.replace(leaf[...] + step.reshape(leaf.shape))

    return jax.tree.map(move, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def router_losses(stats: Stats, c: MoEConfig) -> tuple[jax.Array, Stats]:
    """The router losses of `stats` (MoE layers', stacked by layer) weighted by `aux_coef` and
    `z_coef` (a loss sum, differentiable), and the stats summed over layers with the load kept
    per layer, which `summarize` turns into metrics; `(0, {})` for a dense model."""
    if not stats:
        return jnp.zeros((), jnp.float32), {}
    loss = c.aux_coef * jnp.sum(stats["aux"]) + c.z_coef * jnp.sum(stats["z"])
    summed = {k: jnp.sum(jax.lax.stop_gradient(v)) for k, v in stats.items() if k != "load"}
    return loss, {**summed, "load": jax.lax.stop_gradient(stats["load"])}


def summarize(stats: Stats) -> dict[str, jax.Array]:
    """Metrics from a step's `router_losses` stats (summed over devices and micro-batches): the
    balancing and z losses per layer and token, expert load max/mean (averaged over layers), and
    the fraction of assignments dropped."""
    load = stats["load"]
    return {"moe_aux_loss": stats["aux"] / stats["tokens"], "moe_z_loss": stats["z"] / stats["tokens"],
            "expert_load_max_mean": jnp.mean(jnp.max(load, -1) / jnp.maximum(jnp.mean(load, -1), 1e-9)),
            "moe_dropped_fraction": stats["dropped"] / jnp.maximum(jnp.sum(load), 1.0)}
