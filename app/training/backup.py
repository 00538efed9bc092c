"""Where a training run stands, and its backup: exact resumption after a kill.

Keras 3.15's `BackupAndRestore` restores only the epoch number and restarts that epoch
from its first batch with mid-epoch weights (it records the batch but never reads it back),
so the batches done before the kill are trained twice and the run no longer matches an
uninterrupted one. Resuming exactly needs more, so a backup here is ONE file,
`backup/state.npz`, written atomically (a temporary file, fsync, renamed into place; in a
bucket uploaded under a temporary name and renamed over, `common.files`), that holds:

- every model variable (weights, batch-norm statistics, dropout seed-generator state),
- every optimizer variable (momentum, iteration count, loss scale),
- every metric variable (the running sums of this epoch's train loss and accuracy),
- where training stands, `(epoch, step)`: `step` batches of `epoch` are done,
- the history rows of the finished epochs, the best validation accuracy so far, and the
  settings of the run (so a backup is never resumed with other settings).

A resumed run assigns all of it back and rebuilds the input pipeline at `(epoch, step)`
(`app.data.train_dataset` makes epoch `e`'s order a function of `(seed, e)`), so with
`--deterministic` it continues bit for bit where the killed run was.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from common import files
from common.errors import UsageError
from common.files import atomic_path

BACKUP_DIR = "backup"
BACKUP_FILE = "state.npz"
FORMAT_VERSION = 1
_META = "meta.json"


@dataclasses.dataclass
class RunState:
    """Where training stands; shared by the callbacks and saved in every backup.

    Attributes:
        epoch: the epoch in progress or next to run (0-based).
        step: batches of `epoch` already trained.
        history: one dict per finished epoch (`epoch` 1-based, loss, accuracy, val_loss,
            val_accuracy, learning_rate).
        best: best validation accuracy so far (None before the first epoch ends).
        best_epoch: its epoch, 1-based.
        train_seconds: wall time spent in training so far, over all restarts.
        settings: the run's settings (see `config.settings_fingerprint`).
        optimizer_phase: "frozen" or "full": which phase's optimizer the backup holds
            (the frozen-backbone phase has its own, over the head only).
        final_weights_sha256: digest of the final weights (set when training ends).
    """

    epoch: int = 0
    step: int = 0
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    best: float | None = None
    best_epoch: int | None = None
    train_seconds: float = 0.0
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    optimizer_phase: str = "full"
    final_weights_sha256: str | None = None

    def meta(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> RunState:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in meta.items() if k in fields})


@dataclasses.dataclass
class Backup:
    """A loaded backup: the run state plus the variable values by group."""

    state: RunState
    arrays: dict[str, list[np.ndarray]]
    path: str


def backup_path(directory: str) -> str:
    """The backup file of the run in `directory`."""
    return files.join(directory, BACKUP_DIR, BACKUP_FILE)


def save_backup(path: str, state: RunState, groups: Mapping[str, Sequence[Any]]) -> None:
    """Writes `state` and the values of every variable in `groups` to `path`, atomically.

    Args:
        path: the `.npz` file to (re)write.
        state: where training stands.
        groups: name -> variables (Keras or TF); saved in order, restored in order.
    """
    arrays: dict[str, np.ndarray] = {}
    for group, variables in groups.items():
        for i, variable in enumerate(variables):
            arrays[f"{group}/{i:05d}"] = np.asarray(variable.numpy())
    arrays[_META] = np.frombuffer(json.dumps(state.meta()).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as f:
        f.write(buffer.getbuffer())
        f.flush()
        # Survive a machine loss too, not only a killed process.
        os.fsync(f.fileno())


def _open_npz(path: str) -> np.lib.npyio.NpzFile:
    """The backup's arrays, read whole: `np.load` cannot open a bucket path itself."""
    return np.load(io.BytesIO(files.read_bytes(path)), allow_pickle=False)


def read_state(path: str) -> RunState | None:
    """Only the run state of a backup (cheap: skips the arrays); None when absent/unreadable."""
    try:
        with _open_npz(path) as npz:
            return RunState.from_meta(json.loads(npz[_META].tobytes().decode()))
    except (OSError, ValueError, KeyError):
        return None


def load_backup(path: str) -> Backup | None:
    """Reads a backup written by `save_backup`; None when there is none.

    Raises:
        UsageError: the file exists but is not a readable backup of this program.
    """
    if not files.exists(path):
        return None
    try:
        with _open_npz(path) as npz:
            meta = json.loads(npz[_META].tobytes().decode())
            arrays: dict[str, list[np.ndarray]] = {}
            for key in sorted(k for k in npz.files if k != _META):
                group = key.rsplit("/", 1)[0]
                arrays.setdefault(group, []).append(npz[key])
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(
            f"{path} is not a readable training backup ({type(e).__name__}: {e}); delete it "
            "to start the run over"
        ) from e
    if meta.get("format_version") != FORMAT_VERSION:
        raise UsageError(
            f"{path} was written by another version of app.train (format "
            f"{meta.get('format_version')}); delete it to start the run over"
        )
    return Backup(RunState.from_meta(meta), arrays, path)


def assign(variables: Sequence[Any], values: Sequence[np.ndarray], what: str, path: str) -> None:
    """Assigns backed-up `values` to `variables`, checking that they fit one to one."""
    if len(variables) != len(values):
        raise UsageError(
            f"{path} does not fit this run: it has {len(values)} {what} variables, the run "
            f"has {len(variables)}; use the flags it was written with, or a new --model_dir"
        )
    for variable, value in zip(variables, values, strict=True):
        if tuple(variable.shape) != tuple(value.shape):
            raise UsageError(
                f"{path} does not fit this run: {what} variable {variable.path} has shape "
                f"{tuple(variable.shape)}, the backup {tuple(value.shape)}; use the flags "
                "it was written with, or a new --model_dir"
            )
        variable.assign(value)


def first_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    """`name: old -> new` for the first setting that differs, else None."""
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
    return None
