"""What a layer's remat policy (`model.remat`) keeps on the device for the backward pass, sends to
the host, and computes again, per token: the planner's price of each policy (docs/plan.md).

Activation units are (d_model, d_ff, heads x head_dim, heads x seq_len) values in the model's
dtype, per token of a device's micro-batch; `memory._per_token` turns them into bytes.
"""

from __future__ import annotations

from jaxscale.metrics import train_flops_per_token

Units = tuple[float, float, float, float]

# "none": the layer stash of XLA:CPU's DP step (`--xla_dump_to`'s buffer assignment: 6, 6, 6, 2 at
# d_model 64 and 128; float32 copies and intermediates beyond the textbook 4, 3, 2, 1;
# docs/plan.md); "save_dots" and "full" as measured on TPU v5p (a Llama of d_model 256).
KEPT = {"none": (6.0, 6.0, 6.0, 2.0), "save_dots": (14.5, 0.9, 3.5, 0.0), "full": (1.0, 0.0, 0.0, 0.0)}
# Of a layer's kept d_model units, those sequence parallelism gathers whole: the inputs of the
# attention's and the MLP's first matmuls, saved where the policy saves matmul inputs
SP_GATHERED = {"none": 2.0, "save_dots": 2.0, "full": 0.0}
# The TPU compiler keeps a saved activation of a bfloat16 model as the float32 result its
# producer computes (v5p, d_model 512: q/k/v 3,120 bytes a token against 1,536 in bfloat16, the
# MLP's hidden 6,128 against 3,072, all five names 11,311 against 5,632; docs/plan.md); host
# memory receives the model's dtype (exact). Bytes per value of a saved named activation:
SAVED_BYTES = 4
FLASH = ("cudnn", "splash")


def kind(config) -> str:
    """`none`, `save_dots`, `full`, `save` or `offload`."""
    return config.model.remat.split(":")[0]


def named(config) -> tuple[str, ...]:
    """The activations a `save:`/`offload:` policy names (none for the others)."""
    if kind(config) not in ("save", "offload"):
        return ()
    return tuple(n.strip() for n in config.model.remat.split(":", 1)[1].split(",") if n.strip())


def name_units(config, name: str) -> Units:
    """What one activation a `save:`/`offload:` policy names (models/llama.py) holds per token and
    layer. `mlp_out`, never read back by the backward pass, holds nothing (measured: 0 bytes)."""
    m = config.model
    if name == "qkv":
        return (0.0, 0.0, 1.0 + 2.0 * m.n_kv_heads / m.n_heads, 0.0)
    if name == "attn_out":
        return (0.0, 0.0, 1.0, 0.0)
    if name == "mlp_hidden":  # an MoE layer's: each of the top_k experts' (and the shared one's)
        f = m.moe.top_k * m.moe.d_ff + m.moe.shared_d_ff if m.moe.n_experts else m.d_ff
        return (0.0, f / m.d_ff, 0.0, 0.0)
    return (1.0, 0.0, 0.0, 0.0) if name == "layer_input" else (0.0, 0.0, 0.0, 0.0)


def _sum(units) -> Units:
    return tuple(sum(u[i] for u in units) for i in range(4))


def kept(config) -> tuple[Units, float]:
    """The units one layer keeps on the device per token, and of its d_model units those sequence
    parallelism gathers whole. A named policy keeps the layer's input (the checkpoint's argument)
    unless it offloads `layer_input`, and the activations it saves that the backward reads."""
    policy = kind(config)
    if policy in KEPT:
        return KEPT[policy], SP_GATHERED[policy]
    names = named(config)
    base = () if policy == "offload" and "layer_input" in names else (KEPT["full"],)
    copy = SAVED_BYTES / (2 if config.model.dtype == "bfloat16" else 4)
    saved = [tuple(copy * u for u in name_units(config, n)) for n in names if n != "layer_input"]
    return _sum(list(base) + (saved if policy == "save" else [])), 0.0


def offloaded(config) -> Units:
    """The units one layer sends to host memory per token (an `offload:` policy's names)."""
    if kind(config) != "offload":
        return (0.0, 0.0, 0.0, 0.0)
    return _sum([name_units(config, n) for n in named(config)])


def recompute_flops_per_token(config, pipelined_1f1b: bool = False) -> float:
    """Forward FLOPs per token, over all layers, that the backward pass runs again: none without
    remat; the attention's products under `save_dots` (they have batch dimensions); under `full`
    the layer's forward but its last matmul (w_down, whose output only the next layer reads);
    under a named policy that, less what the names spare: q, k, v their projections, the
    attention's output (before wo) its second product (not under a flash kernel, which runs its
    whole forward again for its own residuals). The MLP's hidden activation spares nothing: the
    gate and up products are needed for its gradient. Within 1% of the TPU compiler's cost
    analysis (docs/plan.md). `pipelined_1f1b`: the 1F1B schedule also runs every layer's
    forward once more, in the tick of a microbatch's backward (`parallel/one_f_one_b.py`), on
    top of the policy's own recomputation there."""
    policy, m = kind(config), config.model
    attention = 4 * m.n_heads * m.head_dim * config.data.seq_len  # QK^T and AV, non-causal
    forward = train_flops_per_token(config) / 3 - 2 * m.d_model * m.vocab_size  # the layers'
    stage = forward if pipelined_1f1b else 0.0
    if policy == "none":
        return stage
    if policy == "save_dots":
        return stage + m.n_layers * attention
    qkv = 2 * m.d_model * (m.n_heads + 2 * m.n_kv_heads) * m.head_dim
    out = 2 * m.n_heads * m.head_dim * m.d_model
    layer = forward / m.n_layers
    mlp = layer - qkv - out - attention
    again = layer - mlp / (2 if m.family == "gpt2" else 3)  # w_down: a third of a gated MLP's
    names = named(config)
    if "qkv" in names:
        again -= qkv
    if "attn_out" in names and m.attention not in FLASH:
        again -= attention / 2
    return stage + m.n_layers * again
