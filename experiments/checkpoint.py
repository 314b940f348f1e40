"""Orbax checkpoints of a run: train state, grain iterator state and a small JSON record.

One step directory per checkpoint, written by `ocp.CheckpointManager`:

    <workdir>/checkpoints/<step>/state   TrainState (params, optimizer state, step)
                                 /data    the grain iterator's position (one file per process)
                                 /meta    JSON: step, seed, rng key data, tokens seen, elapsed time

Saves are asynchronous (the arrays are copied to host before `save` returns, then written in a
background thread) and atomic (orbax writes `<step>.orbax-checkpoint-tmp-*` and renames it when
complete, so a killed save never looks like a checkpoint). The newest `keep` are kept.

Restoring goes through an abstract train state whose leaves carry the *current* mesh's
shardings (`training.abstract_train_state`), so a checkpoint saved on one mesh restores onto
another. A checkpoint that fails to restore (corrupt or missing files) is reported, moved to
`<workdir>/corrupt_checkpoints/` and the previous one is tried.

`restore_params` reads only the parameters of another run's checkpoint (`train.init_from`).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from experiments.data import iterator_restore_args, iterator_save_args

CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "corrupt_checkpoints"


class CheckpointError(RuntimeError):
    """A checkpoint could not be restored."""


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def tree_is_finite(tree: Any) -> bool:
    """True when every floating-point leaf of `tree` is finite (one small jitted reduction)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return bool(_all_finite(leaves)) if leaves else True


class Checkpointer:
    """The checkpoints of one run directory.

    Args:
      workdir: the run directory; checkpoints go to `<workdir>/checkpoints`.
      keep: number of newest checkpoints kept.
      async_save: write in a background thread (call `wait` / `close` before exiting).
      log: where messages about corrupt checkpoints go.
    """

    def __init__(
        self,
        workdir: str,
        *,
        keep: int = 3,
        async_save: bool = True,
        log: Callable[[str], None] = print,
    ):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, CHECKPOINT_DIR)
        self.log = log
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "meta")
        )

    def steps(self) -> list[int]:
        """Saved steps, oldest first."""
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any, meta: dict[str, Any]) -> None:
        """Starts saving checkpoint `step` (async: returns once the arrays are on the host)."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=iterator_save_args(data_iterator),
            meta=ocp.args.JsonSave({**meta, "step": int(step)}),
        )
        self.manager.save(step, args=args, force=True)

    def restore(
        self, step: int, abstract_state: Any, data_iterator: Any | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """(state, meta) of checkpoint `step`; also sets `data_iterator`'s position if given.

        Raises CheckpointError when the checkpoint is unreadable or inconsistent.
        """
        items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        if data_iterator is not None:
            items["data"] = iterator_restore_args(data_iterator)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax/tensorstore raise many types for damaged files
            raise CheckpointError(f"{type(e).__name__}: {_first_line(e)}") from e
        state, meta = restored["state"], restored["meta"]
        if not isinstance(meta, dict) or meta.get("step") != step:
            raise CheckpointError(f"meta record {meta!r} does not name step {step}")
        if int(jax.device_get(state.step)) != step:
            raise CheckpointError(f"state.step={int(state.step)} but the directory is step {step}")
        if not tree_is_finite(state.params):
            raise CheckpointError("parameters are not finite")
        return state, meta

    def restore_latest(
        self, abstract_state: Any, data_iterator: Any | None = None
    ) -> tuple[int, Any, dict[str, Any]] | None:
        """(step, state, meta) of the newest checkpoint that restores, or None if there is none.

        A checkpoint that fails is reported, moved to `<workdir>/corrupt_checkpoints/` (so new
        saves can reuse its step number) and the previous one is tried.
        """
        for step in reversed(self.steps()):
            try:
                state, meta = self.restore(step, abstract_state, data_iterator)
            except CheckpointError as e:
                moved = self._quarantine(step)
                self.log(
                    f"checkpoint at step {step} is corrupt or incomplete ({e}); moved it to "
                    f"{moved}; trying the previous checkpoint"
                )
                continue
            return step, state, meta
        return None

    def _quarantine(self, step: int) -> str:
        target = os.path.join(self.workdir, CORRUPT_DIR, f"{step}-{int(time.time())}")
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"quarantine checkpoint {step}")
        self.manager.reload()
        return target

    def wait(self) -> None:
        """Blocks until pending saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params(source: str, abstract_params: Any) -> tuple[int, Any, str]:
    """The parameters of another run's checkpoint, placed like `abstract_params`.

    `source` is a run's workdir, its `checkpoints/` directory (the newest checkpoint is used),
    or one `checkpoints/<step>` directory. Only `state.params` is read, with orbax's partial
    restore (`PyTreeRestore(..., partial_restore=True)` through a read-only
    `CheckpointManager`); the optimizer state, the step and the data position are not. The
    leaves take the shardings (and dtypes) of `abstract_params`, so any mesh works.

    Returns:
      (step, params, path of the step directory read).

    Raises:
      CheckpointError: `source` holds no checkpoint; the saved parameter tree differs from
        `abstract_params` (the message names the first differing path and both shapes); or the
        checkpoint is unreadable or not finite.
    """
    directory, step = _checkpoints_of(source)
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    handlers = {  # every item of a step, so that orbax knows them all; only "state" is read
        "state": ocp.PyTreeCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
    }
    manager = ocp.CheckpointManager(directory, options=options, item_handlers=handlers)
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(
                f"no checkpoint in {source!r}: expected a run's workdir, its {CHECKPOINT_DIR}/ "
                f"directory or one {CHECKPOINT_DIR}/<step> directory"
            )
        where = os.path.join(directory, str(step))
        saved = manager.item_metadata(step)["state"]
        saved = getattr(saved, "tree", saved)
        if not isinstance(saved, dict) or "params" not in saved:
            raise CheckpointError(f"{where} holds no train state parameters")
        mismatch = first_mismatch(saved["params"], abstract_params)
        if mismatch:
            raise CheckpointError(f"the parameters in {where} do not fit this model: {mismatch}")
        target = {"params": abstract_params}
        args = ocp.args.PyTreeRestore(
            item=target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True,
        )
        try:
            restored = manager.restore(step, args=ocp.args.Composite(state=args))
        except Exception as e:  # orbax/tensorstore raise many types for damaged files
            raise CheckpointError(f"{where}: {type(e).__name__}: {_first_line(e)}") from e
    finally:
        manager.close()
    params = restored["state"]["params"]
    if not tree_is_finite(params):
        raise CheckpointError(f"the parameters in {where} are not finite")
    return step, params, where


def _checkpoints_of(source: str) -> tuple[str, int | None]:
    """(checkpoints directory, step or None for the newest) named by `source`."""
    source = os.path.abspath(source)
    if not os.path.isdir(source):
        raise CheckpointError(f"{source!r} is not a directory")
    if os.path.isdir(os.path.join(source, CHECKPOINT_DIR)):
        return os.path.join(source, CHECKPOINT_DIR), None
    name = os.path.basename(source)
    if name.isdigit() and os.path.isdir(os.path.join(source, "state")):
        return os.path.dirname(source), int(name)
    return source, None


def first_mismatch(saved: Any, expected: Any) -> str | None:
    """The first leaf path where two trees of arrays (or array metadata) differ in presence or
    shape, as "path: reason", or None when they agree."""

    def shapes(tree):
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {_path_name(path): tuple(leaf.shape) for path, leaf in flat}

    old, new = shapes(saved), shapes(expected)
    for path in sorted(set(old) | set(new)):
        if path not in old:
            return f"{path}: not in the checkpoint (this model has shape {new[path]})"
        if path not in new:
            return f"{path}: in the checkpoint (shape {old[path]}) but not in this model"
        if old[path] != new[path]:
            return f"{path}: shape {old[path]} in the checkpoint, {new[path]} in this model"
    return None


def _path_name(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""


def rng_to_json(key: jax.Array) -> list[int]:
    """Typed PRNG key -> JSON list (its raw key data)."""
    return np.asarray(jax.random.key_data(key)).astype(np.uint32).ravel().tolist()


def rng_from_json(data: list[int]) -> jax.Array:
    return jax.random.wrap_key_data(np.asarray(data, np.uint32))
