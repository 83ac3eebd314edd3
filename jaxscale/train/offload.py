"""Host offload: parts of the train state kept in host memory between steps (`train.offload`).

A state part offloaded ("optimizer": the optimizer state; "params": the parameters) lives in the
devices' `pinned_host` memory with its usual sharding; the step copies it into device memory as
it starts and XLA writes the updated part back to the host as the step ends (the jitted step's
output shardings carry the memory kind), so device memory holds it only during the step. What a
step reads and writes of it crosses the host link twice per step; the computation is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from jaxscale.errors import UserError

# each part's train-state field, and its index in DiLoCo's `local` (parameters, optimizer state)
FIELDS = {"optimizer": ("opt_state", 1), "params": ("params", 0)}
PARTS = tuple(FIELDS)
HOST = "pinned_host"


def parts(config, devices) -> tuple[str, ...]:
    """The state parts `train.offload` names, checked against the values and the devices."""
    names = tuple(p.strip() for p in config.train.offload.split(",") if p.strip())
    bad = [p for p in names if p not in PARTS]
    if bad:
        raise UserError(f"train.offload names {bad[0]!r}; use a comma-separated list of "
                        f"{', '.join(PARTS)} (or '' for none)")
    if names:
        kinds = {m.kind for d in devices for m in d.addressable_memories()}
        if HOST not in kinds:
            raise UserError(f"train.offload={config.train.offload!r} needs host memory "
                            f"({HOST!r}), which these devices do not have (memory kinds: "
                            f"{', '.join(sorted(kinds))}); set train.offload=''")
    return names


def placed(state_shardings, offload: tuple[str, ...]):
    """The train state's shardings with the offloaded parts in host memory (under DiLoCo, the
    replicas' parameters or optimizer state too)."""
    fields = {}
    local = list(state_shardings.local) if state_shardings.local is not None else None
    for part in offload:
        field, index = FIELDS[part]
        fields[field] = _on_host(getattr(state_shardings, field))
        if local is not None:
            local[index] = _on_host(local[index])
    if local is not None:
        fields["local"] = tuple(local)
    return state_shardings.replace(**fields)


def _on_host(shardings):
    return jax.tree.map(lambda s: s.with_memory_kind(HOST), shardings)


def fetched(step: Callable, device_shardings) -> Callable:
    """`step(state, batch)` that first copies the state into device memory (`device_shardings`:
    the state's shardings in the default memory)."""

    def run(state, batch):
        return step(jax.device_put(state, device_shardings), batch)

    return run
