"""Orbax checkpoints of a training run: async saves, keep-K, exact resume, resharding restore.

A checkpoint step holds three items: `state` (step, parameters, optimizer state), `data` (the data
iterator's position and seed) and `config` (the run's config as JSON). Orbax writes each step to a
temporary directory and renames it when complete, so a step is visible only once it is whole.
Restores read into the shardings of the *current* mesh (`Trainer.abstract_state()`), so a run saved
on one layout resumes on another without the full model ever being on one device.

Failures are one line each: a save that fails in the background raises `SaveError` at the next
`check`, `save` or `close`, and a step that does not read back is skipped with one warning (when
no step was asked for by number) while the storage layer's tracebacks go to the debug log.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
from collections.abc import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxscale.errors import UserError
from jaxscale.storage_errors import one_line, quiet_storage_errors

log = logging.getLogger("jaxscale")


class SaveError(UserError):
    """A checkpoint save failed (disk full, permission denied, a store error); the run must stop."""


class Unreadable(UserError):
    """A checkpoint step whose files do not read back (`reason`: the storage layer's words)."""

    def __init__(self, step: int, directory: str, reason: str):
        super().__init__(f"checkpoint step {step} in {directory} is unreadable ({reason}); remove "
                         f"that step's directory or use another checkpoint")
        self.step, self.reason = step, reason


def _names(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    """`{dotted.path: (shape, dtype)}` for the leaves of a pytree of arrays or ShapeDtypeStructs."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = ".".join(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path)
        out[name] = (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
    return out


def _is_array_metadata(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _saved_names(metadata_tree) -> dict[str, tuple[tuple[int, ...], str]]:
    leaves = jax.tree.leaves(metadata_tree, is_leaf=_is_array_metadata)
    return {m.name: (tuple(m.shape), str(np.dtype(m.dtype))) for m in leaves}


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


def _check_local_directory(directory: str) -> None:
    """Raise `OSError` if `directory` cannot take checkpoints (a file, or not writable); create it
    if it is missing. Nothing in an existing directory is touched."""
    if os.path.exists(directory):
        if not os.path.isdir(directory):
            raise NotADirectoryError(errno.ENOTDIR, "a file, not a directory", directory)
        if not os.access(directory, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "Permission denied", directory)
    os.makedirs(directory, exist_ok=True)


class Checkpointer:
    """Save and restore a run's checkpoints under `directory` (see `checkpoint` in the config)."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, keep_every: int = 0,
                 async_save: bool = True, read_only: bool = False):
        # a URL (gs://...) goes to Orbax as it is; a local path is made absolute
        directory = os.fspath(directory)
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        self._saving: int | None = None  # the step whose save may still be running
        self._failed = False
        self._damaged: set[int] = set()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep or None, keep_period=keep_every or None,
            save_interval_steps=0 if read_only else 1, create=not read_only,
            enable_async_checkpointing=async_save, read_only=read_only,
            cleanup_tmp_directories=not read_only,  # what a failed or killed save left
            # a step's directory is made before `save` returns, so failing to make it raises
            # there (made in the background, it left Orbax's writer threads waiting for good)
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                    "config": ocp.JsonCheckpointHandler()}
        use = "read" if read_only else "write"
        quiet_storage_errors()
        try:
            if read_only and not epath.Path(self.directory).is_dir():
                raise UserError(f"checkpoint directory {directory!r} does not exist")
            if not read_only and "://" not in self.directory:  # a store checks its own writes
                _check_local_directory(self.directory)
            self._manager = ocp.CheckpointManager(self.directory, options=options,
                                                  item_handlers=handlers)
        except (OSError, ImportError) as e:  # ImportError: no filesystem for the URL's scheme
            raise UserError(f"cannot {use} checkpoint directory {directory!r} ({one_line(e)}); set "
                            f"run_dir or checkpoint.dir to a directory this process can {use}") from None

    def steps(self) -> list[int]:
        """Complete checkpoint steps, oldest first."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state, data_state: dict, config_json: str) -> None:
        """Start saving `step` (returns once the arrays are copied off the devices).

        Raises `SaveError` if the previous save failed in the background or this one cannot start.
        A step already on disk is kept, unless a restore found it damaged: then it is replaced.
        """
        if self._saving is not None:
            self.wait()  # as Orbax would, but a failure names the step that failed
        if step in self._manager.all_steps():
            if step not in self._damaged:
                return  # already saved (a final save right after a periodic one)
            log.warning("replacing the damaged checkpoint step %d in %s", step, self.directory)
            self._manager.delete(step)
            self._damaged.discard(step)
        self._saving = step
        try:
            self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(json.loads(config_json))), force=True)
        except Exception as e:  # noqa: BLE001 - whatever the store raised, the run must stop
            raise self._save_failed(e) from None

    def check(self) -> None:
        """Raise `SaveError` if a background save has failed; never waits for one in progress."""
        if self._saving is None or self._manager.is_saving_in_progress():
            return
        try:
            self._manager.wait_until_finished()  # returns at once: nothing is in progress
        except Exception as e:  # noqa: BLE001
            raise self._save_failed(e) from None
        self._saving = None

    def _save_failed(self, e: Exception) -> SaveError:
        self._failed = True
        intact = [s for s in self.steps() if s != self._saving]
        kept = (f"step {intact[0]} is intact" if len(intact) == 1 else
                f"steps {', '.join(map(str, intact))} are intact" if intact else "no step was saved")
        return SaveError(f"saving checkpoint step {self._saving} to {self.directory} failed "
                         f"({one_line(e)}); {kept}; fix the directory (space, permissions) or set "
                         f"checkpoint.dir, then run again to resume")

    def restore(self, abstract_state, step: int | None = None):
        """`(state, data_state, step)` from `step`, or from the latest step that reads back whole.

        `abstract_state` gives the target shapes, dtypes and shardings. With `step=None` an
        unreadable step is skipped with a warning and the one before it is used.
        """
        return self._newest_readable(lambda s: self._restore_step(abstract_state, s), step)

    def _newest_readable(self, read: Callable[[int], object], step: int | None):
        """`read(step)`, or with `step=None` `read` of the newest step it succeeds on."""
        steps = self.steps()
        if not steps:
            raise UserError(f"no complete checkpoint in {self.directory}")
        if step is not None and step not in steps:
            raise UserError(f"no checkpoint at step {step} in {self.directory}; steps present: "
                            f"{', '.join(map(str, steps))}")
        candidates = [step] if step is not None else steps[::-1]
        for i, s in enumerate(candidates):
            try:
                return read(s)
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - any unreadable file means a damaged step
                self._damaged.add(s)
                if i + 1 == len(candidates):
                    raise self._unreadable(s, e) from None
                log.warning("checkpoint step %d in %s is unreadable (%s); using step %d", s,
                            self.directory, one_line(e), candidates[i + 1])
        raise AssertionError("unreachable")

    def _restore_step(self, abstract_state, step: int):
        check_compatible(self._metadata_names(step), _names(abstract_state),
                         f"checkpoint step {step} in {self.directory}")
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return restored.state, restored.data, step

    def restore_params(self, abstract_params, step: int | None = None,
                       groups: tuple[str, ...] | None = None):
        """Only the parameters (for fine-tuning from another run's checkpoint or inference), from
        `step` or the newest step whose parameters read back.

        `groups`: only these top-level subtrees (`{group: subtree}`), read from the subtrees of
        the same names in the checkpoint; the rest of the checkpoint is not read.
        """
        return self._newest_readable(lambda s: self._restore_params(abstract_params, s, groups),
                                     step)

    def _restore_params(self, abstract_params, step: int, groups: tuple[str, ...] | None):
        saved = {k[len("params."):]: v for k, v in self._metadata_names(step).items()
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
        with self._state_reader() as read:
            return read(step, target, ocp.checkpoint_utils.construct_restore_args(target))["params"]

    @contextlib.contextmanager
    def _state_reader(self):
        """`read(step, target, restore_args)`: a subtree of the `state` item (the PyTree handler
        can read a part of it; `PLACEHOLDER` leaves are not read)."""
        reader = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(read_only=True,
                                                                 save_interval_steps=0),
            item_handlers={"state": ocp.PyTreeCheckpointHandler()})
        try:
            yield lambda step, target, restore_args: reader.restore(
                step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                    target, restore_args=restore_args, partial_restore=True))).state
        finally:
            reader.close()

    def verify(self, step: int, batch_bytes: int = 1 << 30) -> int:
        """Read every array of `step` back to host memory, `batch_bytes` at a time; return the
        bytes read, or raise `Unreadable` if any array does not read back whole."""
        try:
            tree = self._manager.item_metadata(step).state
            leaves, treedef = jax.tree.flatten(getattr(tree, "tree", tree), is_leaf=_is_array_metadata)
            sizes = [int(np.prod(m.shape)) * np.dtype(m.dtype).itemsize for m in leaves]
            batches, size = [[]], 0
            for i, n in enumerate(sizes):
                if batches[-1] and size + n > batch_bytes:
                    batches.append([])
                    size = 0
                batches[-1].append(i)
                size += n
            with self._state_reader() as read:
                for batch in batches:  # leaves outside the batch are PLACEHOLDERs: not read
                    target = [ocp.PLACEHOLDER] * len(leaves)
                    args = [ocp.PLACEHOLDER] * len(leaves)
                    for i in batch:
                        target[i], args[i] = np.zeros(0), ocp.RestoreArgs(restore_type=np.ndarray)
                    read(step, treedef.unflatten(target), treedef.unflatten(args))
            return sum(sizes)
        except Exception as e:  # noqa: BLE001 - any unreadable file means a damaged step
            raise self._unreadable(step, e) from None

    def _metadata_names(self, step: int) -> dict[str, tuple[tuple[int, ...], str]]:
        metadata = self._manager.item_metadata(step)
        if metadata is None or metadata.state is None:
            raise ValueError(f"step {step} has no state metadata")
        return _saved_names(metadata.state)

    def saved_names(self, step: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """The saved state's leaves at `step`: dotted name -> (shape, dtype)."""
        try:
            return self._metadata_names(step)
        except Exception as e:  # noqa: BLE001 - any unreadable file means a damaged step
            raise self._unreadable(step, e) from None

    def saved_config(self, step: int | None = None) -> dict:
        """The run config (as JSON data) saved with `step`, or with the newest readable step."""
        return self._newest_readable(lambda s: self._manager.restore(s, args=ocp.args.Composite(
            config=ocp.args.JsonRestore())).config, step)

    def _unreadable(self, step: int, e: Exception) -> Unreadable:
        return Unreadable(step, self.directory, one_line(e))

    def wait(self) -> None:
        """Block until every started save is on disk; `SaveError` if one failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._save_failed(e) from None
        self._saving = None

    def close(self) -> None:
        """Wait for the last save (`SaveError` if it failed) and release Orbax's threads."""
        try:
            if not self._failed:
                self.wait()
        finally:
            try:
                self._manager.close()
            except Exception as e:  # noqa: BLE001 - the failure was reported already
                if not self._failed:
                    raise self._save_failed(e) from None
                log.debug("closing %s after a failed save: %s", self.directory, one_line(e))

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

