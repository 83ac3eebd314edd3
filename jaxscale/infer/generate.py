"""`Generator`: a trained model on a mesh, with compiled prefill and decode steps.

Parameters follow the logical-axis rules (tensor parallelism shards heads, kv heads and the MLP;
`data`/`fsdp` shard the batch of rows and the cache with it). Prompts of different lengths are
right-padded; each row keeps its own length and cache slot. Generation prefills once, then runs a
jitted decode step per token (the cache donated), so tokens can be streamed as they come.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxscale.checkpoint import Checkpointer
from jaxscale.config import validate
from jaxscale.errors import UserError
from jaxscale.infer.cache import AXES, CACHE_RULES, CacheConfig, KVCache, abstract_cache, cache_bytes
from jaxscale.infer.decode import decode_step, forward, prefill, teacher_forced_logits
from jaxscale.infer.quantize import fit_spec, param_shardings, quantize_params, weight_bytes
from jaxscale.infer.sampling import SamplingParams, sample
from jaxscale.mesh import mesh_from_config
from jaxscale.models import DECODERS, abstract_model
from jaxscale.models.layers import token_loss_sums
from jaxscale.parallel import context_parallel, make_layout
from jaxscale.sharding import Layout, merge_rules, use_layout
from jaxscale.train import lora

PROMPT_BUCKET = 16  # prompts are padded to a multiple of this, so few lengths are compiled
GREEDY = SamplingParams()


def inference_layout(config, mesh: Mesh) -> Layout:
    """The config's layout rules (with `parallel.rules` overrides) plus the cache's axes."""
    if mesh.shape["pipeline"] > 1:
        raise UserError("generation and eval do not run pipeline parallel; set mesh.pipeline=1 "
                        "(tensor and data parallelism work)")
    return Layout(mesh, merge_rules(make_layout(config, mesh).rules, CACHE_RULES))


def load_params(model_cfg, layout: Layout, directory: str, step: int | None = None,
                config=None) -> nnx.State:
    """The float parameters of a `jaxscale train` checkpoint, read straight into `layout`; with
    the run's `config`, a LoRA run's adapters are joined to the base it names (`train/lora.py`)."""
    shapes = abstract_model(model_cfg)[1]
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, param_shardings(layout, shapes))
    if config is not None and lora.enabled(model_cfg):
        return lora.restore_params(config, abstract, directory, step)
    with Checkpointer(directory, read_only=True) as ckpt:
        return ckpt.restore_params(abstract, step)


def prompt_batch(prompts: Sequence[Sequence[int]], max_new_tokens: int, cache: CacheConfig,
                 vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded prompts [batch, padded length] and their lengths, checked against the cache."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or \
            max_new_tokens < 1:
        raise UserError(f"max_new_tokens={max_new_tokens!r} is invalid; use an integer >= 1")
    prompts = [list(p) for p in prompts]
    if not prompts or not all(prompts):
        raise UserError("every prompt needs at least one token; give non-empty prompts")
    if any(not 0 <= t < vocab_size for p in prompts for t in p):
        raise UserError(f"a prompt holds a token id outside the model's vocabulary "
                        f"[0, {vocab_size}); encode prompts with the model's tokenizer")
    longest = max(map(len, prompts))
    if not cache.window and longest + max_new_tokens > cache.slots:
        raise UserError(f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} does "
                        f"not fit the KV cache of {cache.slots} tokens (infer.cache_len, default "
                        f"model.max_seq_len); shorten the prompt, generate fewer tokens or use a "
                        f"sliding window (infer.window)")
    width = -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET
    width = width if cache.window else min(width, cache.slots)
    tokens = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    return tokens, np.array([len(p) for p in prompts], np.int32)


def parse_stop(spec: str, eos_id: int) -> tuple[int, ...]:
    """Stop token ids from `infer.stop`: comma-separated ids and/or "eos"; "" for none."""
    out = []
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        if item == "eos":
            out.append(eos_id)
        elif item.isdigit():
            out.append(int(item))
        else:
            raise UserError(f"infer.stop={spec!r}: {item!r} is neither a token id nor 'eos'; give "
                            f"comma-separated ids and/or eos")
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """Generated ids [batch, steps], `pad_id` after a row's stop token; `lengths` counts each row's
    tokens (its stop token included). Times are seconds, compilation included on a first call."""

    tokens: np.ndarray
    lengths: np.ndarray
    prefill_s: float
    decode_s: float

    def row(self, i: int) -> list[int]:
        return self.tokens[i, :self.lengths[i]].tolist()


class Generator:
    """Generate from, and score text with, a decoder (llama, gpt2) whose parameters live on `layout`'s mesh.

    `weights` is the stored format of the matmul weights: float32, bfloat16, int8 or int4 (groups
    of `group_size` inputs), converted on the mesh from the float32 `params` given.
    """

    def __init__(self, model_cfg, params: nnx.State, layout: Layout, cache: CacheConfig,
                 weights: str = "float32", group_size: int = 128, context_attention: str = "ring"):
        if model_cfg.get("family", "llama") not in DECODERS:
            raise UserError(f"generation runs the decoder families ({', '.join(DECODERS)}), not "
                            f"model.family={model_cfg.family!r}")
        if model_cfg.family == "gpt2" and (cache.window or cache.length > model_cfg.max_seq_len):
            raise UserError(f"model.family=gpt2 has learned positions for model.max_seq_len="
                            f"{model_cfg.max_seq_len} tokens: set infer.window=0 and "
                            f"infer.cache_len <= {model_cfg.max_seq_len}")
        self.model_cfg, self.layout, self.cache_config = model_cfg, layout, cache
        self.graphdef = abstract_model(model_cfg)[0]
        self.dtype = jnp.dtype(model_cfg.dtype)
        params = jax.device_put(params, param_shardings(layout, params))
        if weights != "float32":  # converted where the parameters lie, shard by shard
            quantize = functools.partial(quantize_params, weights=weights, group_size=group_size)
            shardings = param_shardings(layout, jax.eval_shape(quantize, params))
            with use_layout(layout):
                params = jax.jit(quantize, out_shardings=shardings)(params)
        self.params = params
        self._param_shardings = param_shardings(layout, params)
        self.weights, self.context_attention = weights, context_attention
        self._compiled: dict = {}

    @classmethod
    def from_config(cls, config, *, params: nnx.State | None = None, checkpoint: str | None = None,
                    mesh: Mesh | None = None) -> Generator:
        """Parameters from `params` or the checkpoint directory; mesh, weight format and cache from
        the config (`mesh`, `infer`)."""
        validate(config)
        mesh = mesh_from_config(config.mesh) if mesh is None else mesh
        layout = inference_layout(config, mesh)
        cache = CacheConfig.from_config(config)
        if params is None:
            if checkpoint is None:
                raise UserError("give the parameters or a checkpoint directory")
            params = load_params(config.model, layout, checkpoint, config=config)
        return cls(config.model, params, layout, cache, config.infer.weights,
                   config.infer.group_size, config.parallel.context_attention)

    # -- sizes ---------------------------------------------------------------------------------

    def weight_bytes(self) -> int:
        """Bytes of the parameters as stored (scales included)."""
        return weight_bytes(self.params)

    def cache_bytes(self, batch: int) -> int:
        """Bytes of the KV cache for `batch` rows."""
        return cache_bytes(abstract_cache(self.cache_config, self.model_cfg, batch, self.dtype))

    # -- generation ----------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: SamplingParams = GREEDY, stop_tokens: Sequence[int] = (),
                 seed: int = 0, pad_id: int = 0) -> GenerationResult:
        """Tokens after each prompt: up to `max_new_tokens` per row, fewer once every row has
        produced one of `stop_tokens`."""
        start, steps, first = time.perf_counter(), [], None
        for tokens in self.stream(prompts, max_new_tokens, sampling, stop_tokens, seed, pad_id):
            steps.append(tokens)
            first = time.perf_counter() if first is None else first
        end = time.perf_counter()
        out = np.stack(steps, axis=1)
        stops = np.isin(out, list(stop_tokens)) if stop_tokens else np.zeros(out.shape, bool)
        hit = stops.any(axis=1)
        lengths = np.where(hit, stops.argmax(axis=1) + 1, out.shape[1])
        return GenerationResult(out, lengths, first - start, end - first)

    def stream(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
               sampling: SamplingParams = GREEDY, stop_tokens: Sequence[int] = (),
               seed: int = 0, pad_id: int = 0) -> Iterator[np.ndarray]:
        """Yield the next token of every row [batch] as soon as it is computed (`pad_id` for rows
        that are done); stops after `max_new_tokens` or when every row has hit a stop token."""
        steps = self._run(prompts, max_new_tokens, sampling, stop_tokens, seed, pad_id)
        for t, (_, token, done) in enumerate(steps):
            out, finished = jax.device_get((token, done))
            yield out
            if t + 1 == max_new_tokens or finished.all():
                return

    def _run(self, prompts, max_new_tokens: int, sampling: SamplingParams, stop_tokens, seed: int,
             pad_id: int) -> Iterator[tuple[KVCache, jax.Array, jax.Array]]:
        """(cache, tokens, done) after the prefill and after each decode step, on the devices."""
        tokens, lengths = prompt_batch(prompts, max_new_tokens, self.cache_config,
                                       self.model_cfg.vocab_size)
        stop = np.asarray(stop_tokens, np.int32).reshape(-1)
        prefill_fn, step_fn = self._functions(*tokens.shape, len(stop))
        one = self.layout.sharding(PartitionSpec())
        key = jax.random.key(seed)
        stop, params, pad = jax.device_put((stop, sampling.as_array(), np.int32(pad_id)), one)
        state = prefill_fn(self.params, tokens, lengths, stop,
                           jax.device_put(jax.random.fold_in(key, 0), one), params)
        for t in range(1, max_new_tokens + 1):
            yield state
            cache, token, done = state
            state = step_fn(self.params, cache, token, done, stop,
                            jax.device_put(jax.random.fold_in(key, t), one), params, pad)

    def prefill(self, prompts: Sequence[Sequence[int]]) -> KVCache:
        """The KV cache after `prompts` alone (to inspect its layout and size)."""
        return next(self._run(prompts, 1, GREEDY, (), 0, 0))[0]

    def _functions(self, batch: int, width: int, n_stop: int):
        """The prefill and decode step for this batch, prompt width and number of stop tokens,
        both compiled ahead of time (so no compilation interrupts a stream); built once."""
        if (batch, width, n_stop) in self._compiled:
            return self._compiled[batch, width, n_stop]
        graphdef, config = self.graphdef, self.cache_config

        run = forward if self.layout.mesh.shape["context"] == 1 else context_parallel.WholeRowForward(
            forward, self.layout.mesh, self.context_attention)

        def prefill_fn(params, tokens, lengths, stop, key, sampling):
            cache, logits = prefill(nnx.merge(graphdef, params), config, tokens, lengths, run)
            token = sample(logits, key, sampling)
            return cache, token, jnp.isin(token, stop)

        def step_fn(params, cache, token, done, stop, key, sampling, pad):
            cache, logits = decode_step(nnx.merge(graphdef, params), cache, token)
            token = jnp.where(done, pad, sample(logits, key, sampling))
            return cache, token, done | jnp.isin(token, stop)

        def spec(x, sharding):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

        shapes = abstract_cache(config, self.model_cfg, batch, self.dtype)
        names = KVCache(**{n: None if getattr(shapes, n) is None else n for n in AXES},
                        config=config)
        cache_sh = jax.tree.map(lambda x, n: self._sharding(AXES[n], x.shape), shapes, names)
        rows, prompt = self._sharding(("batch",), (batch,)), self._sharding(("batch", None),
                                                                          (batch, width))
        one = self.layout.sharding(PartitionSpec())
        params = jax.tree.map(spec, self.params, self._param_shardings)
        small = (spec(jax.ShapeDtypeStruct((n_stop,), jnp.int32), one),
                 spec(jax.eval_shape(jax.random.key, 0), one),
                 spec(jax.ShapeDtypeStruct((3,), jnp.float32), one))
        token = spec(jax.ShapeDtypeStruct((batch,), jnp.int32), rows)
        with use_layout(self.layout):
            self._compiled[batch, width, n_stop] = (
                jax.jit(prefill_fn, out_shardings=(cache_sh, rows, rows)).lower(
                    params, spec(jax.ShapeDtypeStruct((batch, width), jnp.int32), prompt), token,
                    *small).compile(),
                jax.jit(step_fn, out_shardings=(cache_sh, rows, rows), donate_argnums=1).lower(
                    params, jax.tree.map(spec, shapes, cache_sh), token,
                    spec(jax.ShapeDtypeStruct((batch,), jnp.bool_), rows), *small,
                    spec(jax.ShapeDtypeStruct((), jnp.int32), one)).compile())
        return self._compiled[batch, width, n_stop]

    def _sharding(self, names, shape) -> NamedSharding:
        return self.layout.sharding(fit_spec(self.layout, names, shape))

    # -- scoring -------------------------------------------------------------------------------

    @functools.cached_property
    def _logits_fn(self):
        graphdef, config = self.graphdef, self.cache_config

        def fn(params, tokens):
            return teacher_forced_logits(nnx.merge(graphdef, params), config, tokens)

        return jax.jit(fn, in_shardings=(self._param_shardings, None))

    def logits(self, tokens: jax.Array | np.ndarray) -> jax.Array:
        """Float32 logits [batch, seq, vocab] of `tokens` [batch, seq] with the cache's attention
        (the model's own forward, or the sliding window) and these weights."""
        tokens = jax.device_put(np.asarray(tokens, np.int32),
                                self._sharding(("batch", None), np.shape(tokens)))
        with use_layout(self.layout):
            return self._logits_fn(self.params, tokens)

    @functools.cached_property
    def _score_fn(self):
        def fn(logits, targets, mask):
            loss, count = token_loss_sums(logits, targets, mask)
            return loss, count, jnp.argmax(logits, axis=-1)

        return jax.jit(fn)

    def score(self, inputs: np.ndarray, targets: np.ndarray,
              mask: np.ndarray | None = None) -> tuple[float, int, np.ndarray]:
        """Summed next-token cross-entropy of `targets` after `inputs` [batch, seq] (of the targets
        where `mask` is 1, when given), the number of tokens, and the most likely next token at every
        position."""
        mask = np.ones(np.shape(targets), np.float32) if mask is None else mask
        loss, count, predictions = jax.device_get(self._score_fn(self.logits(inputs), targets, mask))
        return float(loss), int(count), predictions
