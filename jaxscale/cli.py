"""`jaxscale COMMAND [--config configs/x.py] [--config.key=value ...]`, the commands in `USAGE`.

Without `--config` the embedded default (`jaxscale.config.base_config`) is used. Mistakes a user
can fix are printed as one line `jaxscale: error: ...` with exit status 2, without a traceback.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from jaxscale.config import validate
from jaxscale.errors import UserError

USAGE = """usage: jaxscale {train,info} [--config FILE] [--config.KEY=VALUE ...] [--num_devices N]
       jaxscale plan [--config FILE] [--config.KEY=VALUE ...] --cluster PRESET|FILE [--top N]
                     [--compile N] | --check
       jaxscale generate [--config FILE] [--config.KEY=VALUE ...] [--checkpoint DIR] --prompt TEXT
                         [--prompt TEXT ...]
       jaxscale eval [--config FILE] [--config.KEY=VALUE ...] [--checkpoint DIR]
       jaxscale inspect CHECKPOINT_DIR [--verify | --no-verify]
       jaxscale import-hf --model-dir HF_DIR --out CHECKPOINT_DIR [--config.mesh.KEY=VALUE ...]
       jaxscale export-hf --checkpoint CHECKPOINT_DIR --out HF_DIR [--dtype float32|bfloat16|float16]
       jaxscale launch local --processes N [--devices_per_process K] train [TRAIN ARGS ...]
       jaxscale prepare INPUT... --output DIR [--workers N] [--text-key K] [--heldout-every N]
                        [--shard-mb M] [--overwrite] [--config FILE] [--config.KEY=VALUE ...]

  train    train the model the config describes (default: a tiny Llama on the embedded corpus);
           resumes from the run's latest checkpoint; SIGTERM/SIGINT save one and exit cleanly
  info     parameter count and per-device memory of the config under its mesh, without allocating;
           --num_devices N plans for N devices instead of the ones present
  plan     the layouts of the config's model and batch on a cluster before renting it: per-device
           memory, compute, communication per link class, pipeline bubble, step time, tokens/s
           and MFU of the fastest that fit, and the overrides of the best; TPU slices: the best
           --compile N (default 3 with libtpu) compiled for the real topology; --check: predicted
           against compiled on the devices present (docs/plan.md)
  generate continue each prompt with the model of a checkpoint (default: the config's run), on the
           config's mesh; sampling, weight format (int8, int4) and KV cache from `infer.*`
           (docs/inference.md); one prompt is streamed as it is generated
  eval     perplexity of a checkpoint on held-out text (infer.eval_source)
  inspect  the steps, sizes, parameter tree and config of a checkpoint directory; reads every
           array back to find damaged steps (by default when the steps hold under 1 GiB)
  import-hf  a local Hugging Face Llama, GPT-2, Mixtral or Qwen3-MoE (config.json, *.safetensors,
           tokenizer.json) as
           a jaxscale checkpoint, streamed into the mesh's shardings; fine-tune it with
           --config configs/hf.py:CHECKPOINT_DIR (docs/huggingface.md)
  export-hf  a jaxscale llama (MoE: Mixtral or Qwen3-MoE) or gpt2 checkpoint as a Hugging Face
           model directory
  prepare  tokenize .txt, .jsonl(.gz/.bz2/.xz/.zst) and .parquet files, directories, globs or
           URLs with data.tokenizer, in worker processes, into a sharded token store; resumes an
           interrupted run; reports documents, tokens and skipped input (docs/data.md)
  launch   `launch local` runs `jaxscale train` as N processes of one job on this machine (K CPU
           devices each, gloo collectives): the multi-host code paths without a cluster

  train across hosts: --coordinator HOST:PORT --num_processes N --process_id I on every process,
  or nothing on SLURM, Open MPI and Cloud TPU pods (detected); see docs/distributed.md
"""


def _innermost_user_error(e: BaseException) -> UserError | None:
    """The UserError a config file raised, under the wrappers config_flags puts around it."""
    found = None
    while e is not None:
        found = e if isinstance(e, UserError) else found
        e = e.__cause__ or e.__context__
    return found


def _parse(argv: list[str]):
    fv = flags.FlagValues()
    default = os.path.join(os.path.dirname(__file__), "default_config.py")
    args = ["jaxscale", *argv]
    for i, arg in enumerate(argv):
        path = arg[len("--config="):] if arg.startswith("--config=") else None
        if arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        file = None if path is None else path.split(":", 1)[0]  # `file.py:arg` passes an argument
        if file is not None and not os.path.isfile(file):
            raise UserError(f"config file {file!r} not found; pass --config configs/<name>.py")
    try:
        config_flags.DEFINE_config_file("config", default, "experiment config file",
                                        flag_values=fv, sys_argv=args)
        flags.DEFINE_integer("num_devices", None, "devices to plan for (info)", flag_values=fv)
        flags.DEFINE_string("cluster", None, "cluster preset or .toml/.json file (plan)", flag_values=fv)
        flags.DEFINE_integer("top", 10, "layouts to list (plan)", flag_values=fv)
        flags.DEFINE_integer("compile", None, "best layouts to compile for a TPU cluster's slices "
                             "(plan; default 3 where libtpu is installed)", flag_values=fv)
        flags.DEFINE_bool("check", False, "compare predictions with programs compiled on the devices "
                          "present (plan)", flag_values=fv)
        flags.DEFINE_string("checkpoint", None, "checkpoint directory (generate, eval)",
                            flag_values=fv)
        flags.DEFINE_multi_string("prompt", None, "text to continue (generate)", flag_values=fv)
        flags.DEFINE_string("coordinator", None, "host:port of process 0 (train)", flag_values=fv)
        flags.DEFINE_integer("num_processes", None, "processes in the job (train)", flag_values=fv)
        flags.DEFINE_integer("process_id", None, "this process, 0..N-1 (train)", flag_values=fv)
        flags.DEFINE_string("model_dir", None, "Hugging Face model directory (import-hf)",
                            flag_values=fv)
        flags.DEFINE_string("out", None, "output directory (import-hf, export-hf)", flag_values=fv)
        flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                          "tensor dtype written (export-hf)", flag_values=fv)
        flags.DEFINE_string("output", None, "prepared dataset directory (prepare)", flag_values=fv)
        flags.DEFINE_integer("workers", os.cpu_count() or 1, "worker processes (prepare)",
                             flag_values=fv)
        flags.DEFINE_string("text_key", None, ".jsonl/.parquet text field (prepare; default "
                            "data.text_key)", flag_values=fv)
        flags.DEFINE_integer("heldout_every", None, "hold out every N-th document (prepare; default "
                             "data.heldout_every)", flag_values=fv)
        flags.DEFINE_float("shard_mb", 256.0, "tokens per shard file, in MiB (prepare)", flag_values=fv)
        flags.DEFINE_bool("overwrite", False, "replace another prepared dataset (prepare)",
                          flag_values=fv)
        positional = fv(args)[1:]
        config = fv.config
        config.keys()  # a config file that failed to load raises here
    except (KeyError, AttributeError) as e:
        raise UserError(_unknown_override(args) or _first_line(e)) from None
    except (flags.Error, TypeError, ValueError, OSError) as e:
        raise UserError(_first_line(_innermost_user_error(e) or e)) from None
    except Exception as e:  # noqa: BLE001 - an error inside the user's config file
        raise UserError(f"failed to load the config: {type(e).__name__}: {_first_line(e)}") from None
    return config, fv, positional


def _unknown_override(args: list[str]) -> str | None:
    """The message for the first `--config.a.b=v` whose key the base config does not have."""
    from jaxscale.config import base_config

    for arg in args:
        if not arg.startswith("--config."):
            continue
        key = arg[len("--config."):].split("=", 1)[0]
        node = base_config()
        for part in key.split("."):
            if not hasattr(node, "keys") or part not in node:
                return (f"unknown config key '{key}' in {arg}; the valid keys are those of "
                        f"jaxscale/config.py")
            node = node[part]
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().strip('"').splitlines()
    return text[0] if text else type(e).__name__


COMMANDS = ("train", "info", "plan", "generate", "eval", "inspect", "launch", "import-hf", "export-hf",
            "prepare")
PREPARE_FLAGS = ("--text-key", "--heldout-every", "--shard-mb")  # spelled as in the docs


def _launch(argv: list[str]) -> int:
    """`launch local --processes N [--devices_per_process K] train ...`."""
    from jaxscale.distributed import launch_local

    usage = ("usage: jaxscale launch local --processes N [--devices_per_process K] train "
             "[TRAIN ARGS ...]")
    if not argv or argv[0] != "local" or "train" not in argv:
        raise UserError(usage)
    split = argv.index("train")
    tokens = [t for arg in argv[1:split] for t in arg.split("=", 1)]
    opts = {"--devices_per_process": "1", **dict(zip(tokens[::2], tokens[1::2], strict=False))}
    if (len(tokens) % 2 or set(opts) != {"--processes", "--devices_per_process"}
            or not all(v.isdigit() for v in opts.values())):
        raise UserError(usage)
    validate(_parse(argv[split + 1:])[0])  # a bad config: one error here, not one per process
    return launch_local(int(opts["--processes"]), argv[split:],
                        devices_per_process=int(opts["--devices_per_process"]))


def _hf(command: str, config, opts) -> None:
    """`import-hf --model-dir D --out C` and `export-hf --checkpoint C --out D [--dtype]`."""
    from jaxscale import hf

    source = opts.model_dir if command == "import-hf" else opts.checkpoint
    if not source or not opts.out:
        raise UserError(f"usage: jaxscale {command} "
                        + ("--model-dir HF_DIR --out CHECKPOINT_DIR" if command == "import-hf"
                           else "--checkpoint CHECKPOINT_DIR --out HF_DIR [--dtype D]"))
    if command == "import-hf":
        out = hf.import_hf(source, opts.out, config)
        print(f"imported into {out}; fine-tune with: jaxscale train --config configs/hf.py:{out}")
    else:
        files = hf.export_hf(source, opts.out, dtype=opts.dtype, mesh=config.mesh)
        print(f"exported to {opts.out}: config.json, {', '.join(files)}")


def _underscored(arg: str) -> str:
    """`--text-key=K` as absl spells it: `--text_key=K`."""
    name, eq, value = arg.partition("=")
    return "--" + name[2:].replace("-", "_") + eq + value


def _prepare(config, opts, inputs: list[str]) -> None:
    """`prepare INPUT... --output DIR [...]`: the config's data.* settings are the defaults."""
    from jaxscale.data.prepare import prepare_dataset

    if not inputs or not opts.output:
        raise UserError("usage: jaxscale prepare INPUT... --output DIR [--workers N] [--text-key K] "
                        "[--heldout-every N] [--shard-mb M] [--overwrite] [--config FILE]")
    data = config.data
    print(prepare_dataset(
        inputs, opts.output, data.tokenizer, workers=opts.workers,
        text_key=data.text_key if opts.text_key is None else opts.text_key,
        heldout_every=data.heldout_every if opts.heldout_every is None else opts.heldout_every,
        shard_mb=opts.shard_mb, overwrite=opts.overwrite))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "jax" not in sys.modules:  # XLA reads its flags once, when the first backend starts
        from jaxscale.cpu import libtpu_without_tpu, with_xla_cpu_flags

        # `plan --check` compares on 8 devices: a CPU-only host emulates them
        check = argv[:1] == ["plan"] and "--check" in argv
        os.environ.update(with_xla_cpu_flags(os.environ, host_devices=8 if check else 0))
        if not os.environ.get("JAX_PLATFORMS") and libtpu_without_tpu():
            os.environ["JAX_PLATFORMS"] = "cpu"  # not libtpu's failed start on stderr first
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax's info chatter; ours is below
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    logger = logging.getLogger("jaxscale")
    before = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # one line per message, whatever else configured the root logger
    try:
        if command not in COMMANDS:
            raise UserError(f"unknown command {command!r}; use {', '.join(map(repr, COMMANDS))}")
        if command == "inspect":
            options = [a for a in rest if a.startswith("-")]
            dirs = [a for a in rest if not a.startswith("-")]
            if len(dirs) != 1 or options not in ([], ["--verify"], ["--no-verify"]):
                raise UserError("usage: jaxscale inspect CHECKPOINT_DIR [--verify | --no-verify]")
            from jaxscale.checkpoint_report import describe

            print(describe(dirs[0], verify={"--verify": True, "--no-verify": False}.get(
                "".join(options))))
            return 0
        if command == "launch":
            return _launch(rest)
        if command == "import-hf":  # the flag is spelled as in the docs; absl wants underscores
            rest = [("--model_dir" + a[11:]) if a.startswith("--model-dir") else a for a in rest]
        if command == "prepare":
            rest = [_underscored(a) if a.startswith(PREPARE_FLAGS) else a for a in rest]
        config, opts, positional = _parse(rest)
        validate(config)  # before a multi-process run joins its job
        if command != "train" and {opts.coordinator, opts.num_processes, opts.process_id} != {None}:
            raise UserError("--coordinator, --num_processes and --process_id apply to "
                            "`jaxscale train` only")
        if command in ("import-hf", "export-hf"):
            _hf(command, config, opts)
        elif command == "prepare":
            _prepare(config, opts, positional)
        elif command in ("generate", "eval"):
            from jaxscale.infer.commands import evaluate, generate

            (generate if command == "generate" else evaluate)(config, opts.checkpoint, opts.prompt)
        elif command == "train":
            from jaxscale.distributed import initialize
            from jaxscale.train.loop import train

            dist = config.distributed
            initialize(opts.coordinator, opts.num_processes, opts.process_id,
                       init_timeout_s=dist.init_timeout_s, heartbeat_timeout_s=dist.heartbeat_timeout_s)
            import jax

            if jax.process_index() > 0:  # process 0 speaks for the job
                logger.setLevel(logging.WARNING)
            try:
                history = train(config, progress=jax.process_index() == 0)
            except jax.errors.JaxRuntimeError as e:
                if jax.process_count() == 1:
                    raise
                print(f"jaxscale: error: process {jax.process_index()} of {jax.process_count()}: "
                      f"{_first_line(e)[:300]}; another process of the job has probably stopped "
                      f"(see its log)", file=sys.stderr)
                return 1
            if jax.process_index() == 0 and history:
                print(f"done: step {history[-1]['step']} loss {history[-1]['loss']:.4f}; "
                      f"metrics in {config.run_dir}")
            elif jax.process_index() == 0:
                print(f"nothing to do: {config.run_dir} is already at train.steps="
                      f"{config.train.steps}; raise train.steps or use another run_dir")
        elif command == "plan":
            from jaxscale.planner.clusters import PRESETS, load_cluster
            from jaxscale.planner.search import report

            if opts.check:
                from jaxscale.planner.compare import check

                print(check(config))
                return 0
            if not opts.cluster:
                raise UserError(f"jaxscale plan needs --cluster: a preset ({', '.join(PRESETS)}) or a "
                                f".toml/.json file (docs/plan.md), or --check")
            if opts.top < 1 or (opts.compile or 0) < 0:
                raise UserError(f"--top={opts.top} must be at least 1 and --compile={opts.compile} "
                                f"at least 0")
            cluster = load_cluster(opts.cluster)
            compile_top = opts.compile
            if compile_top is None:  # TPU slices compile where libtpu is installed
                compile_top = 3 if cluster.topology and importlib.util.find_spec("libtpu") else 0
            print(report(config, cluster, opts.top, compile_top))
        else:
            from jaxscale.plan import report

            print(report(config, opts.num_devices))
    except UserError as e:
        print(f"jaxscale: error: {e}", file=sys.stderr)
        return 2
    except NotImplementedError as e:
        print(f"jaxscale: not implemented: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jaxscale: interrupted", file=sys.stderr)
        return 130
    finally:  # called in-process (tests, notebooks): leave the logger as it was
        logger.removeHandler(handler)
        logger.setLevel(before[0])
        logger.propagate = before[1]
    return 0


def run() -> None:
    """The `jaxscale` command."""
    from jaxscale.cpu import reexec_with_host_memory

    try:
        reexec_with_host_memory([sys.executable, "-m", "jaxscale.cli", *sys.argv[1:]])
    except UserError as e:
        print(f"jaxscale: error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(main())


if __name__ == "__main__":
    run()
