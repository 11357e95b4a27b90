"""Opening files the guard did not write itself, defensively: regular files only (a FIFO or a device is
never opened for reading, so it cannot hang the run), a size bound, no compressed ``torch.save`` records,
and an exact allowlist for the ``.metadata`` pickle of a ``torch.distributed.checkpoint`` directory.

The allowlist follows torch's ``weights_only`` unpickler (``torch/_weights_only_unpickler.py``): exact
``(module, name)`` pairs, each resolved with a single ``getattr`` on the imported module; a dotted name
(``"os.system"`` asked of a module that imports ``os``) is refused before any lookup.
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
import stat
import zipfile
from typing import IO, Any

import torch

__all__ = [
    "DCP_METADATA_GLOBALS",
    "MetadataUnpickler",
    "RefusedFile",
    "check_storage_paths",
    "check_zip_records",
    "file_key",
    "open_regular",
    "read_dcp_metadata",
]


class RefusedFile(ValueError):
    """A file is not read: not a regular file, too large, compressed, outside the allowlist."""


def file_key(path: str) -> tuple[str, int, int, int] | None:
    """What identifies one version of a file: ``(path, inode, size, mtime_ns)`` (None: it is gone)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (path, st.st_ino, st.st_size, st.st_mtime_ns)


def open_regular(path: str, limit: int | None = None) -> IO[bytes]:
    """Open ``path`` for reading only if it is a regular file (following symlinks) of at most ``limit``
    bytes. Opened non-blocking first, so a FIFO is refused without waiting for a writer."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RefusedFile(f"{path!r} is not a regular file")
        if limit is not None and st.st_size > limit:
            raise RefusedFile(
                f"{path!r} holds {st.st_size} bytes, more than this run can hold ({limit} bytes: 64 MiB plus"
                " 4 times the live model and optimizer state)"
            )
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_zip_records(f: IO[bytes], path: str, limit: int) -> None:
    """A ``torch.save`` file is a zip archive of uncompressed records: refuse compressed records (a small
    file that would inflate in memory) and records whose sizes add up to more than ``limit`` bytes."""
    try:
        with zipfile.ZipFile(f) as z:
            infos = z.infolist()
    except zipfile.BadZipFile as err:
        raise OSError(f"not a torch.save zip archive ({err})") from err
    finally:
        f.seek(0)
    compressed = [i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED]
    if compressed:
        raise RefusedFile(
            f"{path!r} holds compressed records ({', '.join(compressed[:3])}); torch.save never compresses,"
            " and a compressed record could inflate far beyond the file's size"
        )
    total = sum(i.file_size for i in infos)
    if total > limit:
        raise RefusedFile(f"{path!r} would take {total} bytes to read, more than the bound of {limit} bytes")


# ------------------------------------------------------------------------- distributed checkpoint metadata
_DCP = "torch.distributed.checkpoint.metadata"
DCP_METADATA_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        (_DCP, "Metadata"),
        (_DCP, "TensorStorageMetadata"),
        (_DCP, "BytesStorageMetadata"),
        (_DCP, "ChunkStorageMetadata"),
        (_DCP, "TensorProperties"),
        (_DCP, "MetadataIndex"),
        (_DCP, "StorageMeta"),
        (_DCP, "_MEM_FORMAT_ENCODING"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
    }
)
"""Every global a ``.metadata`` file written by ``torch.distributed.checkpoint`` (torch 2.13) needs, as
exact ``(module, name)`` pairs; torch's dtypes (``("torch", "float32")``, ...) are allowed besides."""

_DTYPE_NAMES = frozenset(name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype))


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` file, refusing every global outside :data:`DCP_METADATA_GLOBALS` and
    torch's dtypes. Nothing is resolved by attribute path: a name holding a dot is refused outright."""

    def find_class(self, module: str, name: str) -> Any:
        if "." not in name and (
            (module, name) in DCP_METADATA_GLOBALS or (module == "torch" and name in _DTYPE_NAMES)
        ):
            return getattr(importlib.import_module(module), name)
        raise pickle.UnpicklingError(
            f"weights_only reading refused `{module}` / `{name}` in a distributed checkpoint's metadata"
            " (outside the exact allowlist of what such metadata holds)"
        )


def check_storage_paths(metadata: Any, directory: str) -> None:
    """Every shard file the metadata names must be a plain file name inside ``directory`` (no separator, no
    ``..``, not absolute) and a regular file there."""
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(storage, dict):
        raise RefusedFile(f"{directory!r}: the metadata names no shard files")
    for info in storage.values():
        rel = getattr(info, "relative_path", None)
        if (
            not isinstance(rel, str)
            or not rel
            or rel in (".", "..")
            or os.path.basename(rel) != rel
            or "\0" in rel
        ):
            raise RefusedFile(f"{directory!r}: the metadata names a shard outside the directory: {rel!r}")
        if os.altsep and os.altsep in rel:
            raise RefusedFile(f"{directory!r}: the metadata names a shard outside the directory: {rel!r}")
        full = os.path.join(directory, rel)
        try:
            st = os.stat(full)
        except OSError as err:
            raise OSError(f"shard file {rel!r} is missing ({err})") from err
        if not stat.S_ISREG(st.st_mode):
            raise RefusedFile(f"{full!r} is not a regular file")


def read_dcp_metadata(path: str, limit: int) -> Any:
    """The ``.metadata`` of the DCP directory ``path`` (a regular file of at most ``limit`` bytes), through
    :class:`MetadataUnpickler`, with its shard paths checked (:func:`check_storage_paths`)."""
    with open_regular(os.path.join(path, ".metadata"), limit) as f:
        data = f.read()
    metadata = MetadataUnpickler(io.BytesIO(data)).load()
    check_storage_paths(metadata, path)
    return metadata
