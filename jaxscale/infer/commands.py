"""`jaxscale generate` and `jaxscale eval`: check the input, load the checkpoint, run, print.

Everything a user can get wrong (sampling parameters, weight format, prompt length, stop tokens,
tokenizer) is checked before the checkpoint is read or anything compiles.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from jaxscale.config import validate
from jaxscale.data.tokenizer import Tokenizer, load_tokenizer, prompt_ids
from jaxscale.errors import UserError
from jaxscale.infer.cache import CacheConfig
from jaxscale.infer.evaluate import eval_rows, perplexity
from jaxscale.infer.generate import Generator, parse_stop, prompt_batch
from jaxscale.infer.quantize import check_format
from jaxscale.infer.sampling import SamplingParams

log = logging.getLogger("jaxscale")
MIB = 2**20


def generate(config, checkpoint: str | None, prompts: list[str] | None) -> None:
    """Continue each prompt; one prompt is printed token by token as it is generated."""
    validate(config)
    if not prompts:
        raise UserError("give the text to continue with --prompt TEXT (repeat it for a batch)")
    tokenizer = _tokenizer(config)
    infer = config.infer
    sampling = SamplingParams.from_config(infer)
    stop = parse_stop(infer.stop, tokenizer.eos_id)
    check_format(infer.weights)
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    prompt_batch(encoded, infer.max_new_tokens, CacheConfig.from_config(config),
                 config.model.vocab_size)
    generator = Generator.from_config(config, checkpoint=_checkpoint_dir(config, checkpoint))
    args = (encoded, infer.max_new_tokens, sampling, stop, infer.seed, tokenizer.eos_id)
    start = time.perf_counter()
    if len(prompts) == 1:
        first, count = _print_stream(generator, tokenizer, prompts[0], args)
        prefill_s, decode_s = first - start, time.perf_counter() - first
    else:
        result = generator.generate(*args)
        for i, prompt in enumerate(prompts):
            print(f"--- [{i}]\n{prompt}{tokenizer.decode(result.row(i))}")
        prefill_s, decode_s, count = result.prefill_s, result.decode_s, result.tokens.shape[1]
    rate = (count - 1) / decode_s if count > 1 and decode_s > 0 else float("nan")
    log.info("%d prompt(s), %d tokens each at most: first after %.2f s (compilation included), "
             "then %.1f steps/s; weights %s %.2f MiB, KV cache %.2f MiB", len(prompts), count,
             prefill_s, rate, infer.weights, generator.weight_bytes() / MIB,
             generator.cache_bytes(len(prompts)) / MIB)


def _print_stream(generator: Generator, tokenizer: Tokenizer, prompt: str,
                  args: tuple) -> tuple[float, int]:
    """Print `prompt`, then its continuation as it comes; the time of the first token and the
    number of tokens."""
    sys.stdout.write(prompt)
    ids, shown, first = [], 0, None
    for step in generator.stream(*args):
        first = time.perf_counter() if first is None else first
        ids.append(int(step[0]))
        text = tokenizer.decode(ids)
        stable = len(text) - text.endswith("\ufffd")  # an incomplete UTF-8 character may follow
        sys.stdout.write(text[shown:stable])
        sys.stdout.flush()
        shown = stable
    print(tokenizer.decode(ids)[shown:])
    return first, len(ids)


def evaluate(config, checkpoint: str | None, prompts: list[str] | None) -> None:
    """Print the perplexity of the checkpoint on `infer.eval_source`."""
    validate(config)
    if prompts:
        raise UserError("eval takes no --prompt; it reads infer.eval_source")
    tokenizer = _tokenizer(config)
    check_format(config.infer.weights)
    seq_len, batch = config.data.seq_len, config.infer.eval_batch_size
    if seq_len > config.model.max_seq_len:
        raise UserError(f"data.seq_len={seq_len} exceeds model.max_seq_len="
                        f"{config.model.max_seq_len}; lower data.seq_len")
    if batch < 1:
        raise UserError(f"infer.eval_batch_size={batch} is invalid; use an integer >= 1")
    CacheConfig.from_config(config)
    rows = eval_rows(config, tokenizer)
    generator = Generator.from_config(config, checkpoint=_checkpoint_dir(config, checkpoint))
    result = perplexity(generator, rows, batch)
    window = config.infer.window
    print(f"perplexity {result['perplexity']:.3f} (loss {result['loss']:.4f} nats/token) on "
          f"{result['tokens']:,} tokens of {_eval_name(config)}; weights "
          f"{config.infer.weights} ({generator.weight_bytes() / MIB:.2f} MiB)"
          + (f", sliding window {window} + {config.infer.sink_tokens} sinks" if window else ""))


def _checkpoint_dir(config, checkpoint: str | None) -> str:
    return checkpoint or config.checkpoint.dir or os.path.join(config.run_dir, "checkpoints")


def _tokenizer(config) -> Tokenizer:
    tokenizer = load_tokenizer(config.data.tokenizer)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise UserError(f"tokenizer {config.data.tokenizer} has {tokenizer.vocab_size} ids but "
                        f"model.vocab_size={config.model.vocab_size}; use the config the "
                        f"checkpoint was trained with")
    return tokenizer


def _eval_name(config) -> str:
    source = config.infer.eval_source
    return f"the held-out split of {config.data.source}" if source == "heldout" else source
