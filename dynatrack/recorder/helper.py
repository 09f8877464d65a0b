"""The recorder's side of the probe-decoding helper process (see :mod:`dynatrack.probe_decoder`).

One :class:`DecoderProcess` per recorder and rank. The training thread writes
requests (one short line per probe split and probe step); the writer thread reads
the replies, in the same order. The probe masks live in files in shared memory
(``/dev/shm`` where it exists), mapped by both processes; the helper unlinks each
file once it has mapped it, so nothing is left behind if either process dies (and
:meth:`DecoderProcess.close` removes any it did not get to).
"""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import tempfile
from typing import Any

import numpy as np
import torch

from dynatrack import probe_decoder

log = logging.getLogger(__name__)

#: seconds a reply may take before the helper is given up on (its masks are then decoded in-process)
REPLY_TIMEOUT_S = 60.0


class DecoderError(RuntimeError):
    """The helper process failed or went away: the caller decodes the masks itself."""


class DecoderProcess:
    """A ``python dynatrack/probe_decoder.py`` child process fed through pipes."""

    def __init__(self) -> None:
        # the module's file, not ``-m``: the child imports numpy only, not the dynatrack package
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(probe_decoder.__file__)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
        )
        self.alive = True
        self._failed = False
        self.replies = 0  # decode replies read
        self._ids = 0
        self._paths: list[str] = []

    def shared_masks(
        self, rows: int, cols: int, labels: np.ndarray | None, n_classes: int
    ) -> tuple[int, torch.Tensor]:
        """A zeroed bool ``[rows, cols]`` tensor in shared memory, registered with the helper under a new id."""
        shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        fd, path = tempfile.mkstemp(prefix="dynatrack-probe-", suffix=".masks", dir=shm)
        try:
            os.ftruncate(fd, max(rows * cols, 1))
        finally:
            os.close(fd)
        self._paths.append(path)
        masks = torch.from_file(path, shared=True, size=max(rows * cols, 1), dtype=torch.bool)[: rows * cols]
        self._ids += 1
        self._send({"op": "open", "id": self._ids, "path": path, "rows": rows, "cols": cols,
                    "labels": None if labels is None else labels.tolist(), "classes": n_classes})
        return self._ids, masks.view(rows, cols)

    def request(self, buffer_id: int, *, count: bool, bits: bool) -> None:
        """Ask for the decode of buffer ``buffer_id`` (training thread: one pipe write)."""
        self._send({"op": "decode", "id": buffer_id, "count": count, "bits": bits})

    def reply(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The next reply (writer thread): ``(counts int32[C, w] | None, bits uint8[n, w/8] | None)``."""
        if not self.alive:
            raise DecoderError("the probe decoder process is gone")
        try:
            header = self._header()
            counts = packed = None
            if header.get("counts") is not None:
                c, w = header["counts"]
                counts = np.frombuffer(self._read_exact(c * w * 4), dtype=np.int32).reshape(c, w)
            if header.get("bits") is not None:
                n, b = header["bits"]
                packed = np.frombuffer(self._read_exact(n * b), dtype=np.uint8).reshape(n, b)
            self.replies += 1
        except Exception:
            self.alive = False
            raise
        return counts, packed

    def _header(self) -> dict[str, Any]:
        line = self._read_line()
        header = json.loads(line)
        if not header.get("ok"):
            raise DecoderError(f"the probe decoder process failed: {header.get('error')}")
        return header

    def _read_line(self) -> bytes:
        """One reply line; waits while the helper lives, at most ``REPLY_TIMEOUT_S`` without any output."""
        assert self.proc.stdout is not None
        waited = 0.0
        while not select.select([self.proc.stdout], [], [], 1.0)[0]:
            waited += 1.0
            if self.proc.poll() is not None or waited >= REPLY_TIMEOUT_S:
                self.proc.kill()
                raise DecoderError(
                    f"the probe decoder process gave no reply (exit code {self.proc.poll()}, waited {waited:.0f} s)")
        line = self.proc.stdout.readline()
        if not line:
            raise DecoderError(f"the probe decoder process exited (code {self.proc.wait()})")
        return line

    def _read_exact(self, n: int) -> bytes:
        assert self.proc.stdout is not None
        parts, left = [], n
        while left:
            chunk = self.proc.stdout.read(left)
            if not chunk:
                raise DecoderError("the probe decoder process exited in the middle of a reply")
            parts.append(chunk)
            left -= len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _send(self, msg: dict[str, Any]) -> None:
        if not self.alive:
            raise DecoderError("the probe decoder process is gone")
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(msg).encode() + b"\n")
        except OSError as exc:
            self.alive = False
            raise DecoderError(f"the probe decoder process is gone: {exc}") from exc

    def fail(self, exc: BaseException) -> None:
        """Mark the helper gone (logged once): the recorder decodes probe masks in its own process from now on."""
        self.alive = False
        if not self._failed:
            self._failed = True
            log.warning("dynatrack: the probe decoder process failed (%s); decoding probe masks in the "
                        "training process from now on", exc)

    def close(self) -> None:
        """Close the pipe (the helper exits at end of input), wait for it, remove the mask files."""
        self.alive = False
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            for path in self._paths:
                try:
                    os.unlink(path)
                except OSError:
                    pass  # the helper unlinked it once mapped
            self._paths = []
