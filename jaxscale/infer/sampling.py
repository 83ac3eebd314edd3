"""Next-token sampling: greedy, temperature, top-k and top-p (nucleus), with `jax.random` keys."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxscale.errors import UserError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. `temperature=0` is greedy; `top_k=0` and `top_p=1` are off.

    Top-k keeps the k most likely tokens, top-p the smallest set whose probability reaches p (always
    at least the most likely token); both apply to the temperature-scaled distribution.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        t, k, p = self.temperature, self.top_k, self.top_p
        if not isinstance(t, int | float) or not t >= 0 or t == float("inf"):
            raise UserError(f"sampling temperature={t!r} is invalid; set infer.temperature to a "
                            f"finite number >= 0 (0 is greedy)")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise UserError(f"sampling top_k={k!r} is invalid; set infer.top_k to an integer >= 0 "
                            f"(0 keeps every token)")
        if not isinstance(p, int | float) or not 0 < p <= 1:
            raise UserError(f"sampling top_p={p!r} is invalid; set infer.top_p to a number in (0, 1] "
                            f"(1 keeps every token)")

    @classmethod
    def from_config(cls, infer_cfg) -> SamplingParams:
        """From the config's `infer` section."""
        return cls(infer_cfg.temperature, infer_cfg.top_k, infer_cfg.top_p)

    def as_array(self) -> jax.Array:
        """`[temperature, top_k, top_p]` as float32: traced by `sample`, so changing them does not
        recompile."""
        return jnp.array([self.temperature, self.top_k, self.top_p], jnp.float32)


def sample(logits: jax.Array, key: jax.Array, params: jax.Array) -> jax.Array:
    """Token ids [batch] drawn from `logits` [batch, vocab] under `params` (`SamplingParams.as_array`).

    One descending sort gives both cut-offs: top-k keeps the first k ranks, then top-p the first
    ranks of the renormalised rest whose preceding probability is below p (as Hugging Face does).
    """
    temperature, top_k, top_p = params[0], params[1].astype(jnp.int32), params[2]
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)
    ordered = -jnp.sort(-scaled, axis=-1)
    rank = jnp.arange(logits.shape[-1])
    kept = (top_k == 0) | (rank < top_k)
    probs = jax.nn.softmax(jnp.where(kept, ordered, -jnp.inf), axis=-1)
    kept &= jnp.cumsum(probs, axis=-1) - probs < top_p
    cutoff = jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True)
    drawn = jax.random.categorical(key, jnp.where(scaled >= cutoff, scaled, -jnp.inf), axis=-1)
    return jnp.where(temperature > 0, drawn.astype(jnp.int32), greedy)
