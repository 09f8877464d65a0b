"""Where a run lives: a local path or any ``pyarrow.fs`` URI, and atomic writes there.

>>> import tempfile
>>> loc = RunLocation.create(tempfile.mkdtemp(), "demo-1")
>>> loc.write_bytes_atomic("hello.txt", b"hi")  # False (and nothing written) if the file exists
True
>>> loc.read_bytes("hello.txt")
b'hi'
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class StoreError(ValueError):
    """A run directory, root or file that cannot be used as asked."""


def validate_run_name(name: str) -> str:
    """Return ``name`` if it is a safe run name, else raise :class:`StoreError`.

    Allowed: letters, digits, ``.``, ``_``, ``-``; 1-128 characters; must start
    with a letter or digit; no ``..``. Path separators are refused so a run
    name can never escape its root.
    """
    if not isinstance(name, str) or not _RUN_NAME.match(name) or ".." in name:
        raise StoreError(
            f"invalid run name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without path separators or '..'"
        )
    return name


def resolve_root(root: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """Split ``root`` into a ``pyarrow`` filesystem and a path on it.

    Local paths are made absolute; ``s3://``, ``gs://``, ``file://``, ``hdfs://``
    and the other URIs ``pyarrow.fs.FileSystem.from_uri`` knows are accepted.
    """
    text = os.fspath(root)
    if "://" in text:
        try:
            fs, path = pafs.FileSystem.from_uri(text)
        except (pa_errors() + (ValueError,)) as exc:
            raise StoreError(f"cannot open root {text!r}: {exc}") from exc
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), str(Path(text).expanduser().resolve())


def pa_errors() -> tuple[type[BaseException], ...]:
    import pyarrow as pa

    return (pa.ArrowException, OSError)


@dataclass(frozen=True)
class RunLocation:
    """A run directory ``<root>/<run_id>`` on a filesystem."""

    fs: pafs.FileSystem
    path: str
    run_id: str

    @classmethod
    def create(cls, root: str | os.PathLike, run_id: str) -> "RunLocation":
        fs, base = resolve_root(root)
        validate_run_name(run_id)
        return cls(fs, f"{base}/{run_id}", run_id)

    @classmethod
    def from_run_dir(cls, run_dir: str | os.PathLike) -> "RunLocation":
        fs, path = resolve_root(run_dir)
        return cls(fs, path, path.rstrip("/").rsplit("/", 1)[-1])

    @property
    def uri(self) -> str:
        """The run directory as a user would type it."""
        if isinstance(self.fs, pafs.LocalFileSystem):
            return self.path
        return f"{self.fs.type_name}://{self.path}"

    def join(self, *parts: str) -> str:
        return "/".join([self.path, *parts])

    def exists(self, rel: str = "") -> bool:
        info = self.fs.get_file_info(self.join(rel) if rel else self.path)
        return info.type != pafs.FileType.NotFound

    def mkdir(self, rel: str = "") -> None:
        self.fs.create_dir(self.join(rel) if rel else self.path, recursive=True)

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.join(rel)) as f:
            return f.read()

    def list_files(self, rel: str, recursive: bool = True) -> list[pafs.FileInfo]:
        """Files under ``rel`` (empty if it does not exist), hidden/temp files excluded."""
        if not self.exists(rel):
            return []
        sel = pafs.FileSelector(self.join(rel), recursive=recursive, allow_not_found=True)
        out = []
        for info in self.fs.get_file_info(sel):
            base = info.base_name
            if info.type == pafs.FileType.File and not base.startswith((".", "_")):
                out.append(info)
        return sorted(out, key=lambda i: i.path)

    def write_bytes_atomic(self, rel: str, data: bytes, *, overwrite: bool = False) -> bool:
        """Write ``data`` to ``rel`` via a temporary name and a rename.

        Returns ``False`` (and writes nothing) if the file exists and
        ``overwrite`` is false: nothing written is ever silently replaced.
        """
        target = self.join(rel)
        if not overwrite and self.exists(rel):
            return False
        parent, name = target.rsplit("/", 1)
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, target)
        return True

    def check_writable(self) -> None:
        """Create the run directory's parent and prove a file can be written there.

        Raises :class:`StoreError` naming the root, so an unwritable root fails
        at setup rather than at the first recorded step.
        """
        parent = self.path.rsplit("/", 1)[0] or "/"
        probe = f"{parent}/.dynatrack-write-test-{uuid.uuid4().hex[:8]}"
        try:
            self.fs.create_dir(parent, recursive=True)
            with self.fs.open_output_stream(probe) as f:
                f.write(b"ok")
            self.fs.delete_file(probe)
        except pa_errors() as exc:
            raise StoreError(
                f"cannot write to the run root {parent!r}: {exc}. "
                "Pass a writable `root` to PatternRecorder (a local path or a pyarrow.fs URI)."
            ) from exc
