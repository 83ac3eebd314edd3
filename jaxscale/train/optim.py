"""AdamW with linear warmup, cosine decay and global-norm clipping, from the config's `optim`; its
moments in float32 or in 8 bits (`optim.moments`, `adam8bit.py`)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import optax
from flax import nnx

from jaxscale.errors import UserError
from jaxscale.models.moe import RouterBias
from jaxscale.train.adam8bit import scale_by_adam_8bit

MOMENTS = ("float32", "8bit")


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
    not parameters (`RouterBias`) get no updates. `optim.moments="8bit"` keeps AdamW's moments
    block-wise quantized (`adam8bit.scale_by_adam_8bit`), otherwise it is `optax.adamw`.
    """
    if optim_cfg.moments not in MOMENTS:
        raise UserError(f"optim.moments={optim_cfg.moments!r}; use one of {', '.join(MOMENTS)}")
    schedule = make_schedule(optim_cfg, total_steps)
    adam = (scale_by_adam_8bit if optim_cfg.moments == "8bit" else optax.scale_by_adam)(
        b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps)
    adamw = optax.chain(  # optax.adamw, state and all, with the Adam chosen
        adam, optax.add_decayed_weights(optim_cfg.weight_decay,
                                        mask=lambda params: jax.tree.map(lambda p: p.ndim > 1, params)),
        optax.scale_by_learning_rate(schedule))
    tx = optax.chain(optax.clip_by_global_norm(optim_cfg.clip_norm), adamw)
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
