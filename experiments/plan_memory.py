"""The planner's memory per chip against the TPU compiler's, on TPU v5p:2x2x2 (docs/plan.md table).

    python3 experiments/plan_memory.py [--topology v5p:2x2x2]

Compiles one training step per layout for the topology (libtpu installed, no TPU needed:
`planner.compiled.topology_devices`) and prints a markdown table of predicted against compiled
peak MiB per chip for a Llama of d_model 512, 4 layers, d_ff 1536, 8 heads (4 KV) of 64, seq 256.
"""

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compiling only: the host's jax stays on the CPU

from jaxscale.config import base_config  # noqa: E402
from jaxscale.mesh import AXES, resolve_axis_sizes  # noqa: E402
from jaxscale.planner import clusters, cost  # noqa: E402
from jaxscale.planner.compiled import compile_step, topology_devices  # noqa: E402

LAYOUTS = [  # name, mesh and parallel keys, model and pipeline keys
    ("data=8, remat none", dict(data=8), {}),
    ("data=8, save_dots", dict(data=8), dict(remat="save_dots")),
    ("data=8, full", dict(data=8), dict(remat="full")),
    ("data=8, bfloat16", dict(data=8), dict(dtype="bfloat16")),
    ("fsdp=8", dict(fsdp=8), {}),
    ("data=8, ZeRO-2", dict(data=8, zero_stage=2), {}),
    ("data=2 x tensor=4", dict(data=2, tensor=4), {}),
    ("data=2 x tensor=4, SP", dict(data=2, tensor=4, sequence_parallel=True), {}),
    ("pipeline=2 x data=4 (GPipe, M=4)", dict(pipeline=2, data=4), {}),
    ("pipeline=2 x data=4 (1F1B, M=4)", dict(pipeline=2, data=4), dict(schedule="1f1b")),
    ("pipeline=2 x data=4 (interleaved, V=2, M=4)", dict(pipeline=2, data=4),
     dict(schedule="interleaved", virtual_stages=2)),
]


def layout_config(mesh: dict, model: dict):
    c = base_config()
    c.model.update(vocab_size=264, d_model=512, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=64,
                   d_ff=1536, max_seq_len=256)
    c.data.seq_len = 256
    c.train.update(global_batch_size=32, steps=5)
    c.mesh.data = 1
    for key, value in mesh.items():
        c[next(s for s in ("mesh", "parallel") if key in c[s])][key] = value
    for key, value in model.items():
        c["pipeline" if key in c.pipeline else "model"][key] = value
    return c


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="v5p:2x2x2")
    args = parser.parse_args()
    devices = topology_devices(args.topology)
    print("| layout | predicted MiB | compiled MiB | ratio |\n|---|---:|---:|---:|")
    for name, mesh, model in LAYOUTS:
        config = layout_config(mesh, model)
        sizes = resolve_axis_sizes({a: config.mesh[a] for a in AXES}, len(devices))
        predicted = cost.estimate(config, sizes, clusters.PRESETS["v5p-64"]).memory_bytes
        peak = compile_step(config, devices).peak_bytes
        print(f"| {name} | {predicted / 2**20:.1f} | {peak / 2**20:.1f} | {predicted / peak:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
