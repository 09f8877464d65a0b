"""Where a run lives: a local path or any ``pyarrow.fs`` URI, and atomic writes there.

>>> import tempfile
>>> loc = RunLocation.create(tempfile.mkdtemp(), "demo-1")
>>> loc.write_bytes_atomic("hello.txt", b"hi")  # False (and nothing written) if the file exists
True
>>> loc.read_bytes("hello.txt")
b'hi'
"""

from __future__ import annotations

import logging
import os
import re
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

log = logging.getLogger(__name__)

_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63] or "host"
#: temporary names carry the writing process: ``.<name>.<host>.<pid>.<random>.tmp``
_TMP = re.compile(r"^\..*\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")
_WRITE_TEST = re.compile(r"^\.dynatrack-write-test-(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[0-9a-f]{8}$")


def temp_name(name: str) -> str:
    """A hidden temporary name for ``name`` that says which process on which host wrote it."""
    return f".{name}.{_HOST}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_temp_file(name: str) -> bool:
    """Whether ``name`` is a dynatrack temporary file of a dead process on this host.

    Files of other hosts, of live processes, and names that dynatrack did not make are never stale.
    """
    m = _TMP.match(name) or _WRITE_TEST.match(name)
    return bool(m) and m["host"] == _HOST and int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"]))


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

    @property
    def local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def list_files(self, rel: str, recursive: bool = True, *, hidden: bool = False,
                   refuse_links: bool = False) -> list[pafs.FileInfo]:
        """Files under ``rel`` (empty if it does not exist), hidden/temp files excluded.

        On a local disk symbolic links are never followed (a loop, or a second name for a
        shard, would count rows twice): they are skipped, or with ``refuse_links`` (the
        table directories) refused with a :class:`StoreError` naming the link.
        """
        top = self.join(rel) if rel else self.path
        if not self.exists(rel):
            return []
        if self.local:
            return self._walk_local(top, recursive, hidden, refuse_links)
        sel = pafs.FileSelector(top, recursive=recursive, allow_not_found=True)
        out = []
        for info in self.fs.get_file_info(sel):
            base = info.base_name
            if info.type == pafs.FileType.File and (hidden or not base.startswith((".", "_"))):
                out.append(info)
        return sorted(out, key=lambda i: i.path)

    def _walk_local(self, top: str, recursive: bool, hidden: bool, refuse_links: bool) -> list[pafs.FileInfo]:
        out = []
        if top != self.path and os.path.islink(top):
            self._link(top, refuse_links)
            return out
        for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
            for name in list(dirnames):
                if os.path.islink(os.path.join(dirpath, name)):
                    self._link(os.path.join(dirpath, name), refuse_links)
                    dirnames.remove(name)
            for name in filenames:
                path = os.path.join(dirpath, name)
                if os.path.islink(path):
                    self._link(path, refuse_links)
                    continue
                if hidden or not name.startswith((".", "_")):
                    try:
                        size = os.stat(path).st_size
                    except FileNotFoundError:  # removed while listing (a temporary file renamed)
                        continue
                    out.append(pafs.FileInfo(path, pafs.FileType.File, size=size))
            if not recursive:
                break
        return sorted(out, key=lambda i: i.path)

    def _link(self, path: str, refuse: bool) -> None:
        if refuse:
            raise StoreError(
                f"{path} is a symbolic link inside the run directory {self.path!r}; dynatrack does not "
                "follow links there (a loop or a second name would count rows twice). Remove it, or "
                "copy the files it points to in its place."
            )
        log.debug("symbolic link %s skipped", path)

    def remove_stale_temp_files(self, rel: str = "") -> list[str]:
        """Delete the temporary files (``*.tmp``, write tests) that dead processes of this host left under ``rel``.

        Returns the paths removed. Only names dynatrack makes (see :func:`temp_name`) whose
        process id no longer runs on this host are touched; other hosts' files are left alone.
        """
        removed = []
        try:
            infos = self.list_files(rel, recursive=True, hidden=True)
        except pa_errors():
            return removed
        for info in infos:
            if stale_temp_file(info.base_name):
                try:
                    self.fs.delete_file(info.path)
                    removed.append(info.path)
                except pa_errors():
                    pass
        if removed:
            log.info("removed %d stale temporary files under %s", len(removed), self.join(rel) if rel else self.path)
        return removed

    def write_bytes_atomic(self, rel: str, data: bytes, *, overwrite: bool = False) -> bool:
        """Write ``data`` to ``rel`` via a temporary name and a rename.

        Returns ``False`` (and writes nothing) if the file exists and
        ``overwrite`` is false: nothing written is ever silently replaced. On a
        local disk the no-replace creation is atomic (a hard link, which fails if
        the name exists), so of two processes racing for one name exactly one wins;
        on object stores it is an existence check followed by the upload (see
        docs/reliability.md).
        """
        target = self.join(rel)
        if not overwrite and self.exists(rel):
            return False
        parent, name = target.rsplit("/", 1)
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/{temp_name(name)}"
        try:
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            return self.publish(tmp, target, overwrite=overwrite)
        finally:
            self._discard(tmp)

    def publish(self, tmp: str, target: str, *, overwrite: bool = False) -> bool:
        """Give the complete file ``tmp`` its final name ``target``; ``False`` if ``target`` exists.

        Local disk: the data is fsynced first, then linked (no replace: ``os.link`` fails
        on an existing name) or renamed over the target (``overwrite``); both atomic. Other
        filesystems: a check and a move (S3 objects appear whole, but a check-then-move
        race between two writers is not excluded there).
        """
        if self.local:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            if overwrite:
                os.replace(tmp, target)
                return True
            try:
                os.link(tmp, target)
            except FileExistsError:
                return False
            except OSError:  # a filesystem without hard links: check, then rename
                if os.path.exists(target):
                    return False
                os.rename(tmp, target)
                return True
            os.unlink(tmp)
            return True
        if not overwrite and self.fs.get_file_info(target).type != pafs.FileType.NotFound:
            return False
        self.fs.move(tmp, target)
        return True

    def _discard(self, path: str) -> None:
        """Delete ``path`` if it still exists (a temporary file after a failure)."""
        try:
            if self.fs.get_file_info(path).type != pafs.FileType.NotFound:
                self.fs.delete_file(path)
        except pa_errors():
            log.warning("could not remove the temporary file %s", path)

    def check_writable(self) -> None:
        """Create the run directory's parent and prove a file can be written there.

        Raises :class:`StoreError` naming the root, so an unwritable root fails
        at setup rather than at the first recorded step.
        """
        parent = self.path.rsplit("/", 1)[0] or "/"
        probe = f"{parent}/.dynatrack-write-test-{_HOST}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        try:
            self.fs.create_dir(parent, recursive=True)
            with self.fs.open_output_stream(probe) as f:
                f.write(b"ok")
        except pa_errors() as exc:
            raise StoreError(
                f"cannot write to the run root {parent!r}: {exc}. "
                "Pass a writable `root` to PatternRecorder (a local path or a pyarrow.fs URI)."
            ) from exc
        finally:
            self._discard(probe)
        RunLocation(self.fs, parent, "").remove_stale_write_tests()

    def remove_stale_write_tests(self) -> None:
        """Delete the ``.dynatrack-write-test-*`` files of dead processes of this host directly in this directory."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=False, allow_not_found=True))
        except pa_errors():
            return
        for info in infos:
            if info.type == pafs.FileType.File and _WRITE_TEST.match(info.base_name) and stale_temp_file(info.base_name):
                self._discard(info.path)
