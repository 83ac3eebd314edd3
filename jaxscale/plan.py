"""Size a config under a mesh without allocating: parameter count and per-device state bytes."""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import AbstractMesh, AxisType

from jaxscale.config import validate
from jaxscale.errors import UserError
from jaxscale.mesh import AXES, resolve_axis_sizes
from jaxscale.metrics import train_flops_per_token
from jaxscale.models import abstract_model
from jaxscale.models import lora as lora_model
from jaxscale.parallel import make_layout, zero
from jaxscale.sharding import bytes_per_device
from jaxscale.train import lora
from jaxscale.train.optim import make_optimizer


def plan(config, num_devices: int | None = None) -> dict:
    """Parameter count and per-device bytes of params (a QLoRA base as its codes and scales),
    gradients and optimizer state (under LoRA the adapters' alone).

    The mesh is abstract, so any device count can be planned for (default: the devices present).
    """
    validate(config)
    n = jax.device_count() if num_devices is None else num_devices
    if n < 1:
        raise UserError(f"--num_devices={n} must be at least 1")
    sizes = resolve_axis_sizes({a: config.mesh[a] for a in AXES}, n)
    mesh = AbstractMesh(tuple(sizes[a] for a in AXES), AXES, axis_types=(AxisType.Auto,) * len(AXES))
    layout = make_layout(config, mesh)
    _, params = abstract_model(config.model)
    trained = lora.split(params)[0] if lora.enabled(config.model) else params  # LoRA: the adapters
    tx, _ = make_optimizer(config.optim, config.train.steps)
    opt = jax.eval_shape(tx.init, trained)
    stage = config.parallel.zero_stage
    param_bytes = bytes_per_device(zero.specs(layout, params, stage, from_stage=3), params, sizes)
    grad_bytes = bytes_per_device(zero.specs(layout, trained, stage, from_stage=2), trained, sizes)
    momentum = config.diloco.outer_momentum > 0
    return {
        "mesh": {a: s for a, s in sizes.items() if s > 1} or {"single device": 1},
        **counts(params, config.model.moe),
        "param_bytes_total": sum(p.size * p.dtype.itemsize for p in jax.tree.leaves(params)),
        "param_bytes_per_device": param_bytes,
        "grad_bytes_per_device": grad_bytes,
        "opt_bytes_per_device": bytes_per_device(
            zero.specs(layout, opt, stage, from_stage=1), opt, sizes),
        "flops_per_token": train_flops_per_token(config),
        # DiLoCo: the global parameters and the outer momentum, next to each device's replica
        "diloco_bytes_per_device": param_bytes * (1 + momentum) if config.diloco.enabled else 0,
        # compressed reduction's error feedback: a float32 copy of each device's gradient shards
        "residual_bytes_per_device": grad_bytes if config.parallel.grad_compression != "none" else 0,
        "offload": config.train.offload,
    }


def counts(params, moe) -> dict[str, int]:
    """Trained parameters (`nnx.Param`s: not an MoE router's balancing bias; a QLoRA base's
    weights counted as the values they stand for, their scales not), and those one token uses: of
    each MoE layer's experts, `top_k` of `n_experts`."""
    flat = dict(nnx.to_flat_state(params))
    scales = lora_model.quantized(flat)
    trained = [(_values(v, flat.get(scales.get(p))), "experts" in str(v.get_metadata().get("logical_axes")))
               for p, v in flat.items() if isinstance(v, nnx.Param) and p not in scales.values()]
    total = sum(n for n, _ in trained)
    experts = sum(n for n, routed in trained if routed)
    active = total - experts + (experts // moe.n_experts * moe.top_k if moe.n_experts else 0)
    return {"params": total, "active_params": active}


def _values(var: nnx.Variable, scale: nnx.Variable | None) -> int:
    """The values `var` holds: its size, or for quantized codes the weight's (int4 packs two)."""
    if scale is None:
        return var.size
    return var.size // var.shape[-1] * scale.shape[-1]  # a scale's last axis is the weight's


def report(config, num_devices: int | None = None) -> str:
    """`plan` as a few human-readable lines."""
    p = plan(config, num_devices)
    gib = 2.0**30
    state = (p["param_bytes_per_device"] + p["grad_bytes_per_device"] + p["opt_bytes_per_device"]
             + p["diloco_bytes_per_device"] + p["residual_bytes_per_device"])
    mesh = " x ".join(f"{a}={s}" for a, s in p["mesh"].items())
    return "\n".join([
        f"parameters          {p['params']:,} ({p['param_bytes_total'] / gib:.2f} GiB "
        + ("float32)" if config.model.lora.base_quant == "none" else
           f"with the base in {config.model.lora.base_quant})"),
        *([f"active / token      {p['active_params']:,} (routed experts: top_k of n_experts)"]
          if p["active_params"] != p["params"] else []),
        f"mesh                {mesh}",
        f"params / device     {p['param_bytes_per_device'] / gib:.2f} GiB",
        f"grads / device      {p['grad_bytes_per_device'] / gib:.2f} GiB",
        f"optimizer / device  {p['opt_bytes_per_device'] / gib:.2f} GiB",
        *([f"DiLoCo / device     {p['diloco_bytes_per_device'] / gib:.2f} GiB (global "
           "parameters, outer momentum)"] if p["diloco_bytes_per_device"] else []),
        *([f"residuals / device  {p['residual_bytes_per_device'] / gib:.2f} GiB (error feedback of "
           f"parallel.grad_compression={config.parallel.grad_compression!r})"]
          if p["residual_bytes_per_device"] else []),
        f"state / device      {state / gib:.2f} GiB (activations not included"
        + (f"; train.offload={p['offload']!r} keeps those parts in host memory between steps)"
           if p["offload"] else ")"),
        f"train FLOPs / token {p['flops_per_token']:.3e}",
    ])
