"""Training checkpoints (Orbax) and gemmax's own saved-model folders.

``CheckpointManager`` wraps ``orbax.checkpoint.CheckpointManager`` with the layout the trainer needs. Each
step is a folder ``<dir>/<step>/`` holding two items:

* ``state``: one pytree ``{"params", "opt_state", "rng"}`` of arrays (whatever subset was given — pass only
  the trainable sub-tree under LoRA to keep checkpoints small), saved by Orbax's standard handler: each
  array is written shard by shard from the devices that hold it, and ``restore(target=...)`` puts each shard
  straight onto the devices the target's ``NamedSharding`` names, so sharded save and restore need no
  gather on one host.
* ``meta``: JSON — the step, the data iterator's state (``BatchIterator.state()``), metrics, the RNG key's
  implementation, and anything else small.

Why this is crash-safe: Orbax writes a step into a temporary folder (``<step>.orbax-checkpoint-tmp-*``) and
renames it to ``<step>`` only once every file is written (then writes ``commit_success.txt``); a process
killed during a save leaves only the temporary folder, which ``latest_step`` ignores and the next manager
deletes (``cleanup_tmp_directories``). The previous step is untouched, and older steps are deleted only
after a newer one is committed, so ``keep`` never drops the last good checkpoint.

``save_params`` / ``load_params`` store a model as a sharded Orbax folder (``CausalLM.from_preset`` reads it
too): ``config.json`` (the family's config), ``gemmax_params.json`` (format marker, family and a manifest
of every weight's path, shape and dtype) and ``weights/`` — an Orbax checkpoint rather than safetensors
because it (a) saves and restores *sharded* arrays directly under a mesh (a 27B model never has to fit on one
host), (b) keeps
bfloat16 and int8 as they are, and (c) is already atomic. Exporting to safetensors for other tools is
``gemmax.io.hf``'s job.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from gemmax.io.hf import CheckpointError
from gemmax.models import base
from gemmax.nn.params import unflatten
from gemmax.train.optim import cast_floating, path_str

__all__ = ["CheckpointError", "CheckpointManager", "abstract_tree", "load_params", "save_params"]

PARAMS_FORMAT = "gemmax-params"
PARAMS_FORMAT_VERSION = 1


def abstract_tree(tree: Any, sharding: Any = None) -> Any:
    """``jax.ShapeDtypeStruct`` leaves for ``tree`` (keeping each array's sharding, or using ``sharding``).

    This is the ``target`` form ``restore`` wants: shapes, dtypes and where each array should land.
    """

    def f(x: Any) -> Any:
        s = sharding if sharding is not None else getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s)

    return jax.tree_util.tree_map(f, tree)


def _is_typed_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


class CheckpointManager:
    """Periodic, atomic, rotating training checkpoints in ``directory``.

    ``keep``: how many recent steps to keep (None keeps all). ``save_interval_steps``: ``save`` is a no-op on
    other steps unless ``force=True`` (so the trainer can call it every step). ``async_save``: write in a
    background thread after the arrays are copied to host (training continues meanwhile); ``save`` and
    ``restore`` wait for a previous write to finish first, and so does ``close``.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int | None = 3, save_interval_steps: int = 1,
                 async_save: bool = True) -> None:
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=save_interval_steps,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self._mgr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    # -- queries
    def latest_step(self) -> int | None:
        """The newest *committed* step (a save that was interrupted does not count)."""
        return self._mgr.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    def should_save(self, step: int) -> bool:
        return self._mgr.should_save(step)

    # -- save
    def save(
        self,
        step: int,
        *,
        params: Any = None,
        opt_state: Any = None,
        rng: Any = None,
        data_state: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Save the step's state; returns False when this step is skipped by ``save_interval_steps``.

        ``params`` may be the full tree or only the trainable part; ``rng`` a ``jax.random.key`` (typed) or a
        raw uint32 key. ``data_state``, ``metrics`` and ``extra`` must be JSON-serialisable.
        """
        state: dict[str, Any] = {}
        meta: dict[str, Any] = {"step": int(step), "data_state": data_state,
                                "metrics": _jsonable(metrics or {}), "extra": extra or {}}
        if params is not None:
            state["params"] = params
            meta["param_shapes"] = _shapes(params)
        if opt_state is not None:
            state["opt_state"] = opt_state
        if rng is not None:
            if _is_typed_key(rng):
                meta["rng_impl"] = str(jax.random.key_impl(rng))
                rng = jax.random.key_data(rng)
            state["rng"] = rng
            meta["rng_shape"], meta["rng_dtype"] = list(np.shape(rng)), str(rng.dtype)
        meta["items"] = sorted(state)
        if not state:
            state = {"_": np.zeros((), np.int32)}  # orbax needs a non-empty tree
        return self._mgr.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=force,
        )

    # -- restore
    def restore(self, step: int | None = None, target: dict[str, Any] | None = None) -> dict[str, Any]:
        """Restore ``step`` (default: the latest) as ``{"step", "params", "opt_state", "rng", "data_state",
        "metrics", "extra"}`` (absent parts are None).

        ``target`` mirrors what was saved — ``{"params": ..., "opt_state": ...}`` with concrete arrays or
        ``jax.ShapeDtypeStruct`` leaves (see ``abstract_tree``) — and gives the restored arrays their
        structure (e.g. optax's named tuples), dtype and sharding. Without it, arrays come back as plain
        nested dicts/lists on the default device.
        """
        self._mgr.wait_until_finished()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"{self.directory}: no checkpoint to restore")
        if step not in self._mgr.all_steps():
            raise CheckpointError(f"{self.directory}: no checkpoint for step {step} "
                                  f"(have {self.all_steps() or 'none'})")
        try:
            meta = self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001 - any read failure is a corrupt checkpoint
            raise CheckpointError(f"{self.directory}/{step}: cannot read checkpoint metadata ({e})") from e
        items = meta.get("items", [])
        if target is not None and target.get("params") is not None and meta.get("param_shapes") is not None:
            _check_shapes(meta["param_shapes"], _shapes(target["params"]), f"{self.directory}/{step}")
        if target is not None:
            tgt = {k: v for k, v in target.items() if k in items and k != "rng"}
            missing = set(items) - set(tgt) - {"rng"}
            if missing:
                raise CheckpointError(f"{self.directory}/{step}: target lacks {sorted(missing)} saved there")
            if "rng" in items:
                tgt["rng"] = jax.ShapeDtypeStruct(tuple(meta.get("rng_shape", (2,))), np.dtype(meta["rng_dtype"]))
            state_args = ocp.args.StandardRestore(abstract_tree(tgt) if tgt else None)
        else:
            state_args = ocp.args.StandardRestore()
        try:
            state = self._mgr.restore(step, args=ocp.args.Composite(state=state_args))["state"]
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{self.directory}/{step}: cannot restore arrays ({type(e).__name__}: {e})") \
                from e
        rng = state.get("rng")
        if rng is not None and meta.get("rng_impl"):
            rng = jax.random.wrap_key_data(rng, impl=meta["rng_impl"])
        return {
            "step": int(meta["step"]),
            "params": state.get("params"),
            "opt_state": state.get("opt_state"),
            "rng": rng,
            "data_state": meta.get("data_state"),
            "metrics": meta.get("metrics"),
            "extra": meta.get("extra"),
        }

    # -- lifecycle
    def wait_until_finished(self) -> None:
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _shapes(tree: Any) -> dict[str, list[int]]:
    """Each leaf's path and shape: saved with the params so that a resume can say what differs."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): [int(d) for d in np.shape(leaf)] for path, leaf in flat}


def _check_shapes(saved: dict[str, list[int]], now: dict[str, list[int]], where: str) -> None:
    """A clear error when the run being resumed trains other weights than the checkpoint holds (another
    LoRA rank or targets, full fine-tuning against a LoRA run...), before orbax fails deep inside."""
    if saved == now:
        return
    diffs = [f"{k}: saved {tuple(saved[k])}, now {tuple(now[k])}" for k in saved if k in now and saved[k] != now[k]]
    diffs += [f"{k}: only in the checkpoint" for k in saved if k not in now]
    diffs += [f"{k}: not in the checkpoint" for k in now if k not in saved]
    raise CheckpointError(f"{where}: the checkpoint holds other trainable weights than this run (a different "
                          "LoRA rank or targets?); train into another folder or without resuming:\n  "
                          + "\n  ".join(diffs[:8]) + (f"\n  and {len(diffs) - 8} more" if len(diffs) > 8 else ""))


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    """Metrics often hold jax/numpy scalars; JSON wants Python numbers."""
    out = {}
    for k, v in d.items():
        if hasattr(v, "tolist"):
            v = np.asarray(v).tolist()
        out[str(k)] = v
    return out


# ---- gemmax saved-model folders ------------------------------------------------------------------


def _manifest(params: Any) -> dict[str, list]:
    return {path_str(kp): [list(np.shape(x)), str(x.dtype)]
            for kp, x in jax.tree_util.tree_leaves_with_path(params)}


#: The marker file of a ``save_params`` folder (``gemmax.json`` marks ``CausalLM.save``'s safetensors folder).
PARAMS_MARKER = "gemmax_params.json"


def save_params(path: str | os.PathLike, params: Any, config: Any, *, overwrite: bool = False) -> Path:
    """Write ``params`` and ``config`` to the folder ``path`` (see module docstring for the layout).

    Atomic as a whole: everything is written into a hidden sibling folder that is renamed to ``path`` at
    the end, so a crash leaves either the old folder or the complete new one.
    """
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path}: already exists (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "weights", params)
            ckptr.wait_until_finished()
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=1, default=list))
        (tmp / PARAMS_MARKER).write_text(json.dumps(
            {"format": PARAMS_FORMAT, "version": PARAMS_FORMAT_VERSION, "weights": "orbax",
             "family": base.for_config(config).name, "params": _manifest(params)}, indent=1))
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_params(path: str | os.PathLike, *, target: Any = None, dtype: Any = None) -> tuple[Any, Any]:
    """``(params, config)`` from a folder written by ``save_params``.

    ``target``: an abstract tree (``abstract_tree``/``jax.eval_shape`` with shardings) to restore sharded;
    default: every array on the first device. ``dtype`` casts floating weights after loading.
    """
    path = Path(path).absolute()
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such model folder")
    cfg_file, man_file, weights = path / "config.json", path / PARAMS_MARKER, path / "weights"
    if not cfg_file.exists():
        raise CheckpointError(f"{path}: not a gemmax model folder (no config.json)")
    try:
        manifest = json.loads(man_file.read_text())
        if manifest.get("format") != PARAMS_FORMAT:
            raise ValueError(f"format is {manifest.get('format')!r}")
        entries = manifest["params"]
        family = base.get(manifest.get("family", "gemma"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: incomplete model folder (no {PARAMS_MARKER})") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{man_file}: corrupt manifest ({e})") from None
    try:
        config = family.config_from_dict(json.loads(cfg_file.read_text()))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{cfg_file}: invalid model config ({e})") from None
    if not weights.is_dir():
        raise CheckpointError(f"{path}: incomplete model folder (no weights/)")
    if target is None:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = unflatten({k: jax.ShapeDtypeStruct(tuple(s), jnp.dtype(d), sharding=dev)
                             for k, (s, d) in entries.items()})
    else:
        got = _manifest(target)
        if set(got) != set(entries):
            diff = sorted(set(got) ^ set(entries))[:5]
            raise CheckpointError(f"{path}: target tree does not match the saved weights (e.g. {diff})")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(weights, target)
    except Exception as e:  # noqa: BLE001 - surface any orbax/tensorstore failure as a corrupt folder
        raise CheckpointError(f"{weights}: weights are missing or corrupt ({type(e).__name__}: {e})") from e
    if dtype is not None:
        params = cast_floating(params, dtype)
    return params, config
