"""Orbax checkpoints of a training run: async saves, keep-K, exact resume, resharding restore.

A checkpoint step holds three items: `state` (step, parameters, optimizer state), `data` (the data
iterator's position and seed) and `config` (the run's config as JSON). Orbax writes each step to a
temporary directory and renames it when complete, so a step is visible only once it is whole.
Restores read into the shardings of the *current* mesh (`Trainer.abstract_state()`), so a run saved
on one layout resumes on another without the full model ever being on one device.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxscale.errors import UserError

log = logging.getLogger("jaxscale")


def _names(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    """`{dotted.path: (shape, dtype)}` for the leaves of a pytree of arrays or ShapeDtypeStructs."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = ".".join(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path)
        out[name] = (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
    return out


def _saved_names(metadata_tree) -> dict[str, tuple[tuple[int, ...], str]]:
    leaves = jax.tree.leaves(metadata_tree, is_leaf=lambda x: hasattr(x, "shape"))
    return {m.name: (tuple(m.shape), str(np.dtype(m.dtype))) for m in leaves}


def _problem(e: Exception) -> str:
    """An exception in one short line."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


def check_compatible(saved: dict, wanted: dict, where: str,
                     hint: str = "use the config it was saved with (its config.json) or a fresh "
                                 "run_dir") -> None:
    """Raise `UserError` naming the first differences between a checkpoint's tree and the model's."""
    def order(names):  # parameters first: they say most about which model a checkpoint holds
        return sorted(names, key=lambda k: (not k.startswith("params."), k))

    missing = order(set(wanted) - set(saved))
    extra = order(set(saved) - set(wanted))
    changed = order(k for k in set(saved) & set(wanted) if saved[k] != wanted[k])
    if not (missing or extra or changed):
        return
    if changed:
        k = changed[0]
        what = (f"{k.removesuffix('.value')} is {saved[k][1]}{list(saved[k][0])} in the checkpoint but "
                f"{wanted[k][1]}{list(wanted[k][0])} in the model")
    else:
        what = (f"missing from the checkpoint: {missing[0]}" if missing
                else f"not in the model: {extra[0]}")
    count = len(missing) + len(extra) + len(changed)
    raise UserError(f"{where} does not match the model: {what}"
                    f"{f' ({count - 1} more differences)' if count > 1 else ''}; {hint}")


def parse_init_params_from(spec: str, groups) -> dict[str | None, str]:
    """`checkpoint.init_params_from` as `{group: directory}`; `{None: directory}` for a whole model.

    `spec` is a checkpoint directory, or comma-separated `group=directory` entries naming
    top-level parameter groups of the model (`groups`), e.g. `vision=runs/clip/checkpoints`.
    """
    if "=" not in spec:
        return {None: spec}
    out = {}
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        group, _, directory = (x.strip() for x in entry.partition("="))
        if group not in groups:
            raise UserError(f"checkpoint.init_params_from names group {group!r}; the model's "
                            f"parameter groups are {', '.join(groups)}")
        if not directory or group in out:
            raise UserError(f"checkpoint.init_params_from entry {entry!r}: "
                            f"{'no directory' if not directory else 'group given twice'}; "
                            f"use group=directory,group=directory")
        out[group] = directory
    return out


class Checkpointer:
    """Save and restore a run's checkpoints under `directory` (see `checkpoint` in the config)."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, keep_every: int = 0,
                 async_save: bool = True, read_only: bool = False):
        # a URL (gs://...) goes to Orbax as it is; a local path is made absolute
        directory = os.fspath(directory)
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep or None, keep_period=keep_every or None,
            save_interval_steps=0 if read_only else 1, create=not read_only,
            enable_async_checkpointing=async_save, read_only=read_only)
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                    "config": ocp.JsonCheckpointHandler()}
        try:
            if read_only and not epath.Path(self.directory).is_dir():
                raise UserError(f"checkpoint directory {directory!r} does not exist")
            self._manager = ocp.CheckpointManager(self.directory, options=options,
                                                  item_handlers=handlers)
        except (OSError, ImportError) as e:  # ImportError: no filesystem for the URL's scheme
            use = "read" if read_only else "write"
            raise UserError(f"cannot {use} checkpoint directory {directory!r} ({_problem(e)}); set "
                            f"run_dir or checkpoint.dir to a directory this process can {use}") from None

    def steps(self) -> list[int]:
        """Complete checkpoint steps, oldest first."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state, data_state: dict, config_json: str) -> None:
        """Start saving `step` (returns once the arrays are copied off the devices)."""
        if step in self._manager.all_steps():
            return  # already saved (a final save right after a periodic one)
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(json.loads(config_json))), force=True)

    def restore(self, abstract_state, step: int | None = None):
        """`(state, data_state, step)` from `step`, or from the latest step that reads back whole.

        `abstract_state` gives the target shapes, dtypes and shardings. With `step=None` an
        unreadable latest step is skipped with a warning and the one before it is used.
        """
        steps = self.steps()
        if not steps:
            raise UserError(f"no complete checkpoint in {self.directory}")
        if step is not None and step not in steps:
            raise UserError(f"no checkpoint at step {step} in {self.directory}; steps present: "
                            f"{', '.join(map(str, steps))}")
        candidates = [step] if step is not None else steps[::-1]
        for i, s in enumerate(candidates):
            try:
                return self._restore_step(abstract_state, s)
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - any unreadable file means a damaged step
                if i + 1 == len(candidates):
                    raise self._unreadable(s, e) from None
                log.warning("checkpoint step %d is unreadable (%s); using step %d", s, _problem(e),
                            candidates[i + 1])
        raise AssertionError("unreachable")

    def _restore_step(self, abstract_state, step: int):
        metadata = self._manager.item_metadata(step)
        if metadata is None or metadata.state is None:
            raise ValueError(f"step {step} has no state metadata")
        check_compatible(_saved_names(metadata.state), _names(abstract_state),
                         f"checkpoint step {step} in {self.directory}")
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return restored.state, restored.data, step

    def restore_params(self, abstract_params, step: int | None = None,
                       groups: tuple[str, ...] | None = None):
        """Only the parameters (for fine-tuning from another run's checkpoint).

        `groups`: only these top-level subtrees (`{group: subtree}`), read from the subtrees of
        the same names in the checkpoint; the rest of the checkpoint is not read.
        """
        steps = self.steps()
        if not steps or (step is not None and step not in steps):
            raise UserError(f"no complete checkpoint {'at step ' + str(step) + ' ' if step else ''}"
                            f"in {self.directory}")
        step = steps[-1] if step is None else step
        saved = {k[len("params."):]: v for k, v in self.saved_names(step).items()
                 if k.startswith("params.")}
        where = f"checkpoint step {step} in {self.directory}"
        if groups is None:
            check_compatible(saved, _names(abstract_params), where)
        else:
            in_checkpoint = sorted({k.split(".")[0] for k in saved})
            for g in groups:
                if g not in in_checkpoint:
                    raise UserError(f"no parameter group {g!r} in {where} (it has "
                                    f"{', '.join(in_checkpoint)})")
            abstract_params = {g: abstract_params[g] for g in groups}
            check_compatible({k: v for k, v in saved.items() if k.split(".")[0] in groups},
                             _names(abstract_params), f"{', '.join(groups)} of {where}",
                             hint="a group taken from another run needs the same shapes in both")
        target = {"params": abstract_params}
        reader = ocp.CheckpointManager(  # the PyTree handler can read a subtree of the state
            self.directory, options=ocp.CheckpointManagerOptions(read_only=True,
                                                                 save_interval_steps=0),
            item_handlers={"state": ocp.PyTreeCheckpointHandler()})
        try:
            restored = reader.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True)))
        except Exception as e:  # noqa: BLE001 - any unreadable file means a damaged step
            raise self._unreadable(step, e) from None
        finally:
            reader.close()
        return restored.state["params"]

    def saved_names(self, step: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """The saved state's leaves at `step`: dotted name -> (shape, dtype)."""
        try:
            return _saved_names(self._manager.item_metadata(step).state)
        except Exception as e:  # noqa: BLE001 - any unreadable file means a damaged step
            raise self._unreadable(step, e) from None

    def saved_config(self, step: int) -> dict:
        """The run config (as JSON data) saved with `step`."""
        try:
            return self._manager.restore(step, args=ocp.args.Composite(
                config=ocp.args.JsonRestore())).config
        except Exception as e:  # noqa: BLE001 - any unreadable file means a damaged step
            raise self._unreadable(step, e) from None

    def _unreadable(self, step: int, e: Exception) -> UserError:
        return UserError(f"checkpoint step {step} in {self.directory} is unreadable ({_problem(e)}); "
                         f"remove that step's directory or use another checkpoint")

    def wait(self) -> None:
        """Block until every started save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def describe(directory: str) -> str:
    """A checkpoint directory in a few lines: steps, size on disk, and the parameter tree and config
    of the latest step whose metadata reads back (later ones are marked unreadable)."""
    ckpt = Checkpointer(directory, read_only=True)
    steps = ckpt.steps()
    if not steps:
        raise UserError(f"no complete checkpoint in {directory!r}")
    damaged: dict[int, UserError] = {}
    for latest in reversed(steps):
        try:
            names, config = ckpt.saved_names(latest), ckpt.saved_config(latest)
            break
        except UserError as e:
            damaged[latest] = e
    else:
        raise damaged[steps[-1]]
    lines = [f"checkpoints in {ckpt.directory}"]
    for s in steps:
        step_dir = epath.Path(ckpt.directory) / str(s)
        size = sum((root / f).stat().length for root, _, files in step_dir.walk() for f in files)
        lines.append(f"  step {s:>8}  {size / 2**20:10.2f} MiB" + ("  unreadable" if s in damaged else ""))
    params = {k: v for k, v in names.items() if k.startswith("params.")}
    total = sum(int(np.prod(shape)) for shape, _ in params.values())
    lines.append(f"parameters at step {latest}: {total:,}")
    lines += [f"  {k[len('params.'):].removesuffix('.value'):<40} {dtype:<8} {list(shape)}"
              for k, (shape, dtype) in sorted(params.items())]
    lines.append("config: " + json.dumps(config, sort_keys=True))
    return "\n".join(lines)
