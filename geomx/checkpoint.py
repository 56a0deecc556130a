"""Global-server checkpoints: one ``.npz`` file per global server, no pickles.

A checkpoint holds everything a restarted global server needs to carry on where the dead one left
off: each key's value and the number of rounds it has completed (its *round*), the optimizer (as
data, see :mod:`geomx.optimizer_spec`) with its states and per-key update counts, the
synchronisation mode, the gradient codec, and which clients had pushed or stopped. Rounds are
recorded per key, so the file is consistent whatever moment it is taken at: a round that is only
partly summed is not in it, and the parties resend its pushes after the restart (see
docs/System Design.md, "Checkpoint and restore").

Layout: ``header`` is a uint8 array holding UTF-8 JSON (format ``geomx-checkpoint/1``), ``v<i>`` is
the value of the i-th key of ``header["keys"]``, ``states`` is the optimizer states' byte buffer
described by ``header["states"]`` (the same encoding as ``GET_STATES`` / ``save_optimizer_states``).
The file is written to a temporary name in the same directory, flushed to disk and renamed over the
previous checkpoint, so a crash in the middle of a save leaves the last good checkpoint intact.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import zipfile
from typing import Any, Dict, List, Optional

import numpy as np

from .errors import GeoMXError
from .wire import DTYPES

FORMAT = "geomx-checkpoint/1"
_VALUE_DTYPES = {np.dtype(d).str for d in DTYPES.values()}


class CheckpointError(GeoMXError):
    """A checkpoint file cannot be used (missing, truncated, corrupt, or from another topology)."""


@dataclasses.dataclass
class KeyRecord:
    key: int
    value: np.ndarray  # this server's slice of the key, flat
    completed: int  # rounds of this key the value includes
    update_count: int = 0  # optimizer updates applied to this key (Adam's bias correction uses it)
    offset: int = 0  # the slice of the key this server holds: [offset, offset + value.size) ...
    total: int = -1  # ... of ``total`` elements (-1: the whole key)

    def __post_init__(self) -> None:
        if self.total < 0:
            self.total = int(self.value.size)


@dataclasses.dataclass
class Checkpoint:
    rank: int
    num_global_server: int
    keys: List[KeyRecord]
    global_sync: bool = True
    compression: Optional[dict] = None
    optimizer: Optional[dict] = None  # optimizer spec
    num_update: int = 0
    states: Optional[tuple] = None  # (description, uint8 blob) from optimizer_spec.states_to_wire
    stopped: List[List[str]] = dataclasses.field(default_factory=list)  # [link name, identity hex]
    pushing: List[List[str]] = dataclasses.field(default_factory=list)

    def header(self) -> dict:
        return {
            "format": FORMAT, "rank": self.rank, "num_global_server": self.num_global_server,
            "global_sync": self.global_sync, "compression": self.compression, "optimizer": self.optimizer,
            "num_update": self.num_update,
            "states": None if self.states is None else self.states[0],
            "keys": [{"key": r.key, "numel": int(r.value.size), "dtype": r.value.dtype.str,
                      "completed": r.completed, "update_count": r.update_count, "offset": r.offset,
                      "total": r.total} for r in self.keys],
            "stopped": self.stopped, "pushing": self.pushing,
        }


def file_name(directory: str, rank: int) -> str:
    """Where global server ``rank`` keeps its checkpoint inside ``GEOMX_CHECKPOINT_DIR``."""
    return os.path.join(directory, f"global_server{rank}.npz")


def save(ckpt: Checkpoint, path: str) -> int:
    """Write ``ckpt`` to ``path`` atomically; returns the file's size in bytes."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    header = json.dumps(ckpt.header()).encode()
    arrays: Dict[str, np.ndarray] = {"header": np.frombuffer(header, dtype=np.uint8)}
    for i, rec in enumerate(ckpt.keys):
        arrays[f"v{i}"] = np.ascontiguousarray(rec.value).reshape(-1)
    if ckpt.states is not None:
        arrays["states"] = np.ascontiguousarray(ckpt.states[1]).view(np.uint8)
    fd, tmp = tempfile.mkstemp(prefix=".geomx-ckpt-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return os.path.getsize(path)


def _field(header: dict, name: str, kind: Any) -> Any:
    value = header.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CheckpointError(f"header field {name!r} is missing or not {getattr(kind, '__name__', kind)}")
    return value


def load(path: str) -> Checkpoint:
    """Read and validate the checkpoint at ``path``; :class:`CheckpointError` says what is wrong."""
    try:
        return _load(path)
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint {path} refused: {exc}") from None
    except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile, UnicodeDecodeError,
            MemoryError) as exc:
        # Truncated or corrupt files end up here (zip directory missing, CRC mismatch, short member).
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or corrupt?): "
                              f"{type(exc).__name__}: {exc}") from None


def _check_member(z: Any, name: str, size: int) -> None:
    """Refuse member ``name`` unless its bytes are stored in the file (np.savez stores, never
    compresses) and its .npy header describes no more data than that: numpy allocates what the header
    claims before reading, so a member claiming 2^40 elements would otherwise raise MemoryError."""
    member = name + ".npy"
    try:
        info = z.zip.getinfo(member)
    except KeyError:
        raise CheckpointError(f"member {name} is missing") from None
    if info.compress_type != zipfile.ZIP_STORED or info.file_size > size:
        raise CheckpointError(f"member {name} is compressed or larger than the file")
    with z.zip.open(member) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    count = 1
    for n in shape:
        count *= n
    if count * np.dtype(dtype).itemsize > info.file_size:
        raise CheckpointError(f"member {name} claims {shape} x {np.dtype(dtype)}, more than the "
                              f"{info.file_size} bytes it holds")


def _load(path: str) -> Checkpoint:
    size = os.path.getsize(path)
    z = np.load(path, allow_pickle=False)
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise CheckpointError("not a geomx checkpoint (a bare array, not an .npz archive)")
    with z:
        for name in z.files:
            _check_member(z, name, size)
        if "header" not in z.files:
            raise CheckpointError("not a geomx checkpoint (no header)")
        header = json.loads(bytes(z["header"]).decode())
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise CheckpointError(f"format is {header.get('format') if isinstance(header, dict) else None!r}, "
                                  f"expected {FORMAT!r}")
        rank = _field(header, "rank", int)
        num_servers = _field(header, "num_global_server", int)
        if not 0 <= rank < num_servers:
            raise CheckpointError(f"rank {rank} outside 0..{num_servers - 1}")
        keys = []
        for i, desc in enumerate(_field(header, "keys", list)):
            if not isinstance(desc, dict):
                raise CheckpointError(f"key entry {i} is not an object")
            key, numel = _field(desc, "key", int), _field(desc, "numel", int)
            dtype, completed = _field(desc, "dtype", str), _field(desc, "completed", int)
            offset, total = int(desc.get("offset", 0)), int(desc.get("total", numel))
            if dtype not in _VALUE_DTYPES or key < 0 or numel < 0 or completed < 0 \
                    or not 0 <= offset <= offset + numel <= total:
                raise CheckpointError(f"key entry {i} is malformed: {desc}")
            value = z[f"v{i}"]
            if value.dtype.str != dtype or value.shape != (numel,):
                raise CheckpointError(f"value of key {key} is {value.dtype.str} {value.shape}, the header says "
                                      f"{dtype} ({numel},)")
            keys.append(KeyRecord(key, value, completed, int(desc.get("update_count", 0)), offset, total))
        states = None
        if header.get("states") is not None:
            states = (header["states"], z["states"])
        stopped = _field(header, "stopped", list)
        pushing = _field(header, "pushing", list)
        for entry in stopped + pushing:
            if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(x, str) for x in entry)):
                raise CheckpointError(f"malformed client entry {entry!r}")
        return Checkpoint(rank=rank, num_global_server=num_servers, keys=keys,
                          global_sync=bool(header.get("global_sync", True)), compression=header.get("compression"),
                          optimizer=header.get("optimizer"), num_update=int(header.get("num_update", 0)),
                          states=states, stopped=stopped, pushing=pushing)
