"""AdamW with linear warmup, cosine decay and global-norm clipping, from the config's `optim`."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import optax
from flax import nnx

from jaxscale.models.moe import RouterBias


def make_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine decay to `lr * min_lr_ratio` at `total_steps`."""
    warmup = min(optim_cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optim_cfg.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=optim_cfg.lr * optim_cfg.min_lr_ratio)


def make_optimizer(optim_cfg, total_steps: int, frozen: Sequence[str] = ()) -> tuple[
        optax.GradientTransformation, optax.Schedule]:
    """The optimizer and its learning-rate schedule. Weight decay skips vectors (norm scales).

    Parameters under a top-level key in `frozen` (e.g. "vision") get no updates; clipping sees
    only the trained ones. (They keep optimizer moments, which stay zero.) Variables that are
    not parameters (`RouterBias`) get no updates.
    """
    schedule = make_schedule(optim_cfg, total_steps)
    tx = optax.chain(
        optax.clip_by_global_norm(optim_cfg.clip_norm),
        optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                    weight_decay=optim_cfg.weight_decay,
                    mask=lambda params: jax.tree.map(lambda p: p.ndim > 1, params)),
    )
    if frozen:  # zero their gradients (before clipping) and their updates (after weight decay)
        def is_frozen(params):
            return jax.tree_util.tree_map_with_path(
                lambda path, _: getattr(path[0], "key", None) in frozen, params)

        zero = optax.masked(optax.set_to_zero(), is_frozen)
        tx = optax.chain(zero, tx, zero)
    # state that is not trained (an MoE router's balancing bias) gets no update either
    untrained = optax.masked(optax.set_to_zero(), _untrained)
    return optax.chain(tx, untrained), schedule


def _untrained(params):
    return jax.tree.map(lambda v: isinstance(v, RouterBias), params,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
