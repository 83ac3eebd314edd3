"""`import_hf` and `export_hf`: Hugging Face model directories <-> jaxscale Orbax checkpoints.

Import reads `config.json` into the `model` config section and streams each safetensors tensor
into its parameter's sharding on the config's mesh: every device reads only its own shard from
the memory-mapped file, so no device (and no host buffer) ever holds the whole model. Export
writes `config.json` and safetensors shards one layer at a time. Names and layouts per
architecture are in `mapping.py`. An MoE router's balancing bias (`RouterBias`) is state no HF
checkpoint has: import sets it to zeros, export leaves it out (and refuses a nonzero one, which
would route differently).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx

from jaxscale.checkpoint import Checkpointer
from jaxscale.config import base_config, validate
from jaxscale.errors import UserError
from jaxscale.hf import mapping, safetensors
from jaxscale.hf.mapping import Tensor
from jaxscale.mesh import mesh_from_config
from jaxscale.models import lora
from jaxscale.models.moe import RouterBias

log = logging.getLogger("jaxscale")
TOKENIZER = "tokenizer.json"
EXPORT_DTYPES = ("float32", "bfloat16", "float16")


def _path(keys) -> str:
    return ".".join(str(k.key) for k in keys if hasattr(k, "key"))


def _variables(state) -> dict[str, nnx.Variable]:
    """The variables of an `nnx.State` by path."""
    leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return {_path(p): v for p, v in leaves[0]}


def _specs(m, variables: dict[str, nnx.Variable]) -> tuple[dict[str, Tensor], set[str]]:
    """The HF tensor of every parameter of the model section `m` (whose `variables` these are),
    and the paths of its router biases, which no HF tensor holds."""
    specs = mapping.tensors(m)
    biases = {p for p, v in variables.items() if isinstance(v, RouterBias)}
    params = set(variables) - biases
    if set(specs) != params:  # the mapping tables and the models must agree
        raise AssertionError(f"mapping/model mismatch: {sorted(set(specs) ^ params)}")
    return specs, biases


def _hf_shape(t: Tensor, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the safetensors tensor that holds a parameter's slice of `shape` (the shape
    past its stacked axes)."""
    n = t.part[1]
    if len(shape) == t.split:
        return (math.prod(shape) * n,)
    rows, cols = math.prod(shape[:t.split]), math.prod(shape[t.split:])
    return (cols, rows) if t.transpose else (rows, cols * n)


def _span(dims: tuple[int, ...], slices: tuple[slice, ...]) -> tuple[int, int, tuple[int, ...]]:
    """The flat range of `dims` covering `slices[0]` with the inner dims whole, and its shape."""
    start, stop, _ = slices[0].indices(dims[0])
    inner = math.prod(dims[1:])
    return start * inner, stop * inner, (stop - start, *dims[1:])


def read_block(a: np.ndarray, t: Tensor, shape: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
    """`index` of a parameter's slice of `shape` (one layer's, or one expert's) from its HF
    tensor `a`, reading only the rows and columns that `index` covers."""
    k, n = t.part
    r0, r1, rshape = _span(shape[:t.split], index[:t.split])
    if len(shape) == t.split:
        off = k * a.shape[0] // n
        block = np.asarray(a[off + r0:off + r1]).reshape(rshape)
        rest = (slice(None), *index[1:])
    else:
        c0, c1, cshape = _span(shape[t.split:], index[t.split:])
        if t.transpose:
            block = np.asarray(a[c0:c1, r0:r1]).T
        else:
            off = k * a.shape[1] // n
            block = np.asarray(a[r0:r1, off + c0:off + c1])
        block = block.reshape(*rshape, *cshape)
        rest = (slice(None), *index[1:t.split], slice(None), *index[t.split + 1:])
    return block[rest]


def hf_tensor(p: np.ndarray, t: Tensor) -> np.ndarray:
    """A parameter's slice `p` (one layer's, or one expert's) in the HF layout of `t` (before
    joining `part`s)."""
    if p.ndim == t.split:
        return p.reshape(-1)
    m = p.reshape(math.prod(p.shape[:t.split]), -1)
    return m.T if t.transpose else m


def read_hf_config(model_dir: str) -> dict:
    path = Path(model_dir, "config.json")
    if not Path(model_dir).is_dir():
        raise UserError(f"model directory {model_dir!r} does not exist; pass --model-dir with a "
                        f"local Hugging Face model (config.json + *.safetensors)")
    if not path.is_file():
        raise UserError(f"no config.json in {model_dir}; pass a Hugging Face model directory")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None


def import_config(model_dir: str, config: ml_collections.ConfigDict | None = None
                  ) -> ml_collections.ConfigDict:
    """`config` (default: the base config) with the `model` section of the HF model in
    `model_dir`, and its tokenizer.json as `data.tokenizer` when it has one."""
    config = ml_collections.ConfigDict(base_config() if config is None else config)
    config.model.update(mapping.model_config(read_hf_config(model_dir)))
    if Path(model_dir, TOKENIZER).is_file():
        config.data.tokenizer = str(Path(model_dir, TOKENIZER).resolve())
    config.data.seq_len = min(config.data.seq_len, config.model.max_seq_len)
    return config


def _check_tensors(files: safetensors.Tensors, specs: dict[str, Tensor],
                   shapes: dict[str, tuple[int, ...]], model_dir: str, family: str) -> None:
    """Every tensor present with the shape the config implies; nothing unaccounted for."""
    wanted: dict[str, tuple[int, ...]] = {}
    for path, t in specs.items():
        for index in np.ndindex(shapes[path][:t.stacked]):
            wanted[t.at(index)] = _hf_shape(t, shapes[path][t.stacked:])
    for name, shape in wanted.items():
        if name not in files:
            raise UserError(f"tensor {name} is missing from {model_dir} (config.json describes "
                            f"a model that has it)")
        if files.shape(name) != shape:
            raise UserError(f"tensor {name} in {model_dir} has shape {list(files.shape(name))}; "
                            f"config.json implies {list(shape)}")
        if files.dtype(name).kind != "f" and files.dtype(name).name != "bfloat16":
            raise UserError(f"tensor {name} in {model_dir} is {files.dtype(name)}, not floating "
                            f"point (quantized checkpoints are not supported)")
    unused = [n for n in files.names() if n not in wanted and not n.endswith(mapping.IGNORED_SUFFIXES)
              and n != "lm_head.weight"]  # a tied head saved anyway is the embedding
    if unused:
        raise UserError(f"tensor {unused[0]} in {model_dir} has no place in jaxscale's {family} "
                        f"({len(unused)} such tensors); is config.json the one of these weights?")


def _normalised(files: safetensors.Tensors) -> safetensors.Tensors:
    """GPT-2 checkpoints saved by the original code lack the `transformer.` prefix."""
    if any(n.startswith("h.0.") for n in files.names()):
        files.rename(lambda n: n if n.startswith("lm_head") else "transformer." + n)
    return files


def load_hf_params(model_dir: str, config: ml_collections.ConfigDict, layout) -> object:
    """The parameters of the HF model in `model_dir`, as arrays sharded by `layout` (an
    `nnx.State` in the tree of `config.model`'s model)."""
    from jaxscale.infer.quantize import param_shardings
    from jaxscale.models import abstract_model

    files = _normalised(safetensors.Tensors(model_dir))
    m = config.model
    shapes_tree = abstract_model(m)[1]
    variables = _variables(shapes_tree)
    specs, biases = _specs(m, variables)
    shapes = {p: v.shape for p, v in variables.items()}
    _check_tensors(files, specs, shapes, model_dir, m.family)
    shardings = param_shardings(layout, shapes_tree)

    def build(keys, sds, sharding):
        path = _path(keys)
        if path in biases:
            return jax.device_put(np.zeros(sds.shape, sds.dtype), sharding)
        t, shape, n = specs[path], sds.shape, specs[path].stacked

        def fetch(index):  # one tensor per index of the stacked axes this shard covers
            stacked = [range(*s.indices(d)) for s, d in zip(index[:n], shape[:n], strict=True)]
            blocks = [read_block(files.get(t.at(i)), t, shape[n:], index[n:])
                      for i in itertools.product(*stacked)]
            return np.stack(blocks).reshape(*map(len, stacked), *blocks[0].shape).astype(np.float32)

        return jax.make_array_from_callback(shape, sharding, fetch)

    leaves = jax.tree_util.tree_flatten_with_path(shapes_tree)[0]
    sh = jax.tree.leaves(shardings)
    treedef = jax.tree.structure(shapes_tree)
    return treedef.unflatten([build(k, s, shd) for (k, s), shd in zip(leaves, sh, strict=True)])


def import_hf(model_dir: str, out: str, config: ml_collections.ConfigDict | None = None) -> str:
    """Convert the HF model in `model_dir` into a jaxscale checkpoint directory `out` (step 0,
    parameters only; the run config inside says the model and tokenizer). Returns `out`."""
    from jaxscale.parallel import make_layout

    config = import_config(model_dir, config)
    validate(config)
    if Path(out).exists() and any(Path(out).iterdir()):
        raise UserError(f"output directory {out} is not empty; pass a new --out")
    layout = make_layout(config, mesh_from_config(config.mesh))
    params = load_hf_params(model_dir, config, layout)
    if config.data.tokenizer != "byte":  # kept with the weights: the run config points at it
        Path(out).mkdir(parents=True, exist_ok=True)
        shutil.copy(config.data.tokenizer, Path(out, TOKENIZER))
        config.data.tokenizer = str(Path(out, TOKENIZER).resolve())
    with Checkpointer(out, keep=0, async_save=False) as ckpt:
        ckpt.save(0, {"params": params}, {}, config.to_json())
    count = sum(v.get_value().size for v in _variables(params).values() if not isinstance(v, RouterBias))
    log.info("imported %s (%s, %s parameters) into %s", model_dir, config.model.family, f"{count:,}",
             out)
    return out


def checkpoint_config(directory: str) -> ml_collections.ConfigDict:
    """The run config saved with the newest readable step of a jaxscale checkpoint directory."""
    with Checkpointer(directory, read_only=True) as ckpt:
        saved = ckpt.saved_config()
    config = base_config()
    _merge(config, saved)
    return config


def _merge(node: ml_collections.ConfigDict, saved: dict) -> None:
    for key, value in saved.items():
        if key not in node:
            continue  # a key this version no longer has
        if isinstance(value, dict):
            _merge(node[key], value)
        else:
            node[key] = tuple(map(tuple, value)) if isinstance(node[key], tuple) else value


def _layer_tensors(params: dict, specs: dict[str, Tensor], dtype: np.dtype
                   ) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array) for every tensor, one HF layer at a time (a parameter's slice of it
    copied to the host once, for all its experts), parts joined."""
    layers: dict[int, dict[str, list[tuple[str, tuple[int, ...]]]]] = {}
    for path, t in specs.items():
        for index in np.ndindex(params[path].shape[:t.stacked]):
            layer = t.layer(index)
            layers.setdefault(-1 if layer is None else layer, {}).setdefault(
                t.at(index), []).append((path, index))
    held: tuple[tuple[str, tuple[int, ...]] | None, np.ndarray | None] = (None, None)
    for layer in sorted(layers):
        for name, items in layers[layer].items():
            parts = []
            for path, index in sorted(items, key=lambda x: specs[x[0]].part[0]):
                t, n = specs[path], len(specs[path].strides)
                if held[0] != (path, index[:n]):  # a parameter's experts come one after another
                    held = (path, index[:n]), np.asarray(jax.device_get(params[path][index[:n]]))
                parts.append(hf_tensor(held[1][index[n:]], t))
            yield name, np.concatenate(parts, axis=-1).astype(dtype)


def export_hf(checkpoint_dir: str, out: str, *, dtype: str = "float32",
              max_shard_bytes: int = 4 << 30, step: int | None = None,
              mesh: ml_collections.ConfigDict | None = None) -> list[str]:
    """Write the parameters of a jaxscale checkpoint as a HF model directory `out`: config.json,
    safetensors shards (with an index when there are several) and the run's tokenizer.json.

    The parameters are read onto `mesh` (a config `mesh` section; default: one device) and
    copied to the host one layer's tensor at a time."""
    from jaxscale.data.tokenizer import load_tokenizer
    from jaxscale.infer.generate import load_params
    from jaxscale.parallel import make_layout

    if dtype not in EXPORT_DTYPES:
        raise UserError(f"--dtype {dtype}; use one of {', '.join(EXPORT_DTYPES)}")
    if Path(out).exists() and not Path(out).is_dir():
        raise UserError(f"--out {out} is a file, not a directory; pass a new directory")
    config = checkpoint_config(checkpoint_dir)
    m = config.model
    eos = None
    if config.data.tokenizer != "byte" and Path(config.data.tokenizer).is_file():
        eos = load_tokenizer(config.data.tokenizer).eos_id
    hf_cfg = mapping.hf_config(m, dtype, eos)
    if Path(out).exists() and any(Path(out).iterdir()):
        raise UserError(f"output directory {out} is not empty; pass a new --out")
    if mesh is None:
        config.mesh.update(data=-1, fsdp=1, tensor=1, pipeline=1, expert=1, context=1)
        devices = jax.devices()[:1]
    else:
        config.mesh = ml_collections.ConfigDict(mesh)
        devices = None
    layout = make_layout(config, mesh_from_config(config.mesh, devices))
    params = load_params(m, layout, checkpoint_dir, step, config=config)
    if lora.enabled(m):  # the adapters folded into their weights, W + alpha/rank A B, in one program
        # (a QLoRA base's W dequantized first: the export carries the base's quantization error)
        params = jax.jit(lora.merge, static_argnums=1)(params, lora.LoraConfig.from_config(m))
    variables = _variables(params)
    specs, biases = _specs(m, variables)
    for path in sorted(biases):
        if np.any(np.asarray(jax.device_get(variables[path].get_value()))):
            raise UserError(f"{path} (the router's balancing bias, model.moe.bias_rate="
                            f"{m.moe.bias_rate}) is nonzero: {hf_cfg['architectures'][0]} has no "
                            f"router bias, so the export would route tokens differently")
    params = {p: variables[p].get_value() for p in specs}
    np_dtype = np.dtype(safetensors.DTYPES[{"float32": "F32", "bfloat16": "BF16",
                                            "float16": "F16"}[dtype]])
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out {out} ({e.strerror}); pass a directory this process "
                        f"can write") from None
    shards: list[list[tuple[str, np.ndarray]]] = [[]]
    size = 0
    files: list[str] = []
    weight_map: dict[str, int] = {}
    total = 0

    def flush():
        nonlocal size
        files.append(f"part-{len(files):05d}.safetensors")
        safetensors.write(Path(out, files[-1]), shards[-1])
        shards.append([])
        size = 0

    for name, a in _layer_tensors(params, specs, np_dtype):
        if size and size + a.nbytes > max_shard_bytes:
            flush()
        shards[-1].append((name, a))
        weight_map[name] = len(files)
        size += a.nbytes
        total += a.nbytes
    flush()
    if len(files) == 1:
        Path(out, files[0]).rename(Path(out, "model.safetensors"))
        files = ["model.safetensors"]
    else:
        n = len(files)
        final = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for old, new in zip(files, final, strict=True):
            Path(out, old).rename(Path(out, new))
        files = final
        Path(out, "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total},
             "weight_map": {k: files[v] for k, v in sorted(weight_map.items())}}, indent=2))
    Path(out, "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True))
    if config.data.tokenizer != "byte" and Path(config.data.tokenizer).is_file():
        shutil.copy(config.data.tokenizer, Path(out, TOKENIZER))
    log.info("exported %s (%s, %s) to %s: %s", checkpoint_dir, m.family, dtype, out,
             ", ".join(files))
    return files
