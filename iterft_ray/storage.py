"""Where a run's outputs live: a local path or a URI (`s3://`, `gs://`, `file://`), through `pyarrow.fs`.

`StoragePath` is the one interface the loop, the recorder and the trainer actor write and
read through, so a trainer on one node and a driver on another see the same checkpoints
when `loop.output_dir` is a bucket. Credentials and the endpoint come from the store's
standard environment variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_ENDPOINT_URL`, `GOOGLE_APPLICATION_CREDENTIALS`, ...) of the process that touches the
store, never from the config: a pickled `StoragePath` carries its location only. (pyarrow's S3
reads AWS_ENDPOINT_URL and AWS_ENDPOINT_URL_S3 itself; tests/test_storage.py gives the
endpoint no other way.)

Writes are whole files and atomic where the store allows: on local disk a temp file
renamed over the target; in an object store one object written from a complete buffer,
which readers see whole or not at all. A directory cannot be written atomically to a
store, so `upload_directory` writes a chosen file last and readers treat that file as
the directory's commit mark.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs


class StoragePath:
    """A file or directory on local disk or in an object store, named by a path or a URI.

    `str()` gives the location as the user wrote it (plus children), for messages. A local
    one is also an `os.PathLike`; one in a store refuses to be, so no code can quietly read
    a node's local disk in its place.
    """

    def __init__(self, location: str | os.PathLike):
        location = os.fspath(location)
        if "://" in location:
            try:
                self._fs, path = pafs.FileSystem.from_uri(location)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
                raise ValueError(f"not a URI pyarrow.fs can open ({e})") from None
            self._location = location.rstrip("/")
            self._path = path.rstrip("/")
        else:
            self._fs, self._location = pafs.LocalFileSystem(), str(Path(location))
            self._path = os.path.abspath(location)

    @classmethod
    def of(cls, location: StoragePath | str | os.PathLike) -> StoragePath:
        return location if isinstance(location, StoragePath) else cls(location)

    def __truediv__(self, name: str) -> StoragePath:
        child = object.__new__(StoragePath)
        child._fs = self._fs
        child._path = f"{self._path}/{name}"
        child._location = f"{self._location}/{name}" if "://" in self._location else str(Path(self._location) / name)
        return child

    def __str__(self) -> str:
        return self._location

    def __repr__(self) -> str:
        return f"StoragePath({self._location!r})"

    def __fspath__(self) -> str:
        if not self.is_local:
            raise TypeError(f"{self._location} is in an object store, not on local disk")
        return self._path

    def __reduce__(self):
        # The location only, resolved again where it lands: credentials stay in each process's
        # environment. A local path travels absolute, as the driver resolved it.
        return StoragePath, (self._path if self.is_local else self._location,)

    @property
    def name(self) -> str:
        return self._path.rsplit("/", 1)[-1]

    @property
    def is_local(self) -> bool:
        return isinstance(self._fs, pafs.LocalFileSystem)

    # ---------------------------------------------------------------- reading

    def exists(self) -> bool:
        return self._type() != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self._type() == pafs.FileType.Directory

    def is_file(self) -> bool:
        return self._type() == pafs.FileType.File

    def iterdir(self) -> list[StoragePath]:
        """The entries of this directory, sorted by name; none when it does not exist."""
        infos = self._fs.get_file_info(pafs.FileSelector(self._path, allow_not_found=True))
        return sorted((self / info.base_name for info in infos), key=lambda p: p.name)

    def read_bytes(self) -> bytes:
        with self._fs.open_input_stream(self._path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def check_reachable(self) -> None:
        """Raise OSError when the store refuses this process (credentials) or the bucket does not exist.

        Asks the store once, before a run writes anything; a local path always passes
        (its directories are made on the first write).
        """
        if self.is_local:
            return
        bucket = self._path.split("/", 1)[0]
        if self._fs.get_file_info(bucket).type != pafs.FileType.Directory:
            raise OSError(f"the bucket {bucket!r} does not exist (or this process's credentials cannot see it)")

    # ---------------------------------------------------------------- writing

    def write_bytes(self, data: bytes | pa.Buffer) -> None:
        """Write the whole file atomically: a renamed temp file on local disk, one complete object in a store."""
        if not self.is_local:
            with self._fs.open_output_stream(self._path) as f:
                f.write(data)
            return
        self._fs.create_dir(self._path.rsplit("/", 1)[0], recursive=True)
        tmp = f"{self._path}.tmp"
        with self._fs.open_output_stream(tmp) as f:
            f.write(data)
        self._fs.move(tmp, self._path)

    def copy_to(self, target: StoragePath) -> None:
        """Copy this file to `target` (any store), streamed rather than read whole."""
        pafs.copy_files(self._path, target._path, source_filesystem=self._fs, destination_filesystem=target._fs)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def mkdir(self) -> None:
        """Make this directory (and its parents) on local disk; a store needs none, its keys are whole paths."""
        if self.is_local:
            self._fs.create_dir(self._path, recursive=True)

    def delete(self) -> None:
        """Delete this file or directory (everything under it); nothing when it does not exist."""
        kind = self._type()
        if kind == pafs.FileType.Directory:
            self._fs.delete_dir(self._path)
        elif kind == pafs.FileType.File:
            self._fs.delete_file(self._path)

    # ---------------------------------------------------------------- directories

    def upload_directory(self, local_dir: str | Path, last: str) -> None:
        """Replace this directory by a copy of `local_dir`, writing its file `last` after every other.

        What was here is deleted first, so a reader that takes `last` as the mark of a
        complete copy never sees a mix of old and new files, nor a partial copy after a crash.
        """
        local_dir = Path(local_dir)
        self.delete()
        local = pafs.LocalFileSystem()
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file() and p != local_dir / last):
            pafs.copy_files(str(path), f"{self._path}/{path.relative_to(local_dir).as_posix()}",
                            source_filesystem=local, destination_filesystem=self._fs)
        pafs.copy_files(str(local_dir / last), f"{self._path}/{last}",
                        source_filesystem=local, destination_filesystem=self._fs)

    def upload_files(self, local_dir: str | Path) -> None:
        """Copy every file of `local_dir` into this directory (each whole), replacing those of the same name."""
        pafs.copy_files(str(local_dir), self._path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self._fs)

    @contextmanager
    def local_copy(self) -> Iterator[Path]:
        """This directory on local disk, for a reader that needs files: itself when local,
        else a download into a temp directory, removed on exit."""
        if self.is_local:
            yield Path(self._path)
            return
        tmp = tempfile.mkdtemp(prefix="iterft-download-")
        try:
            target = Path(tmp) / self.name
            for info in self._fs.get_file_info(pafs.FileSelector(self._path, recursive=True)):
                if info.type != pafs.FileType.File:
                    continue  # a store lists directories only where someone made a marker for one
                local = target / info.path[len(self._path) + 1 :]
                local.parent.mkdir(parents=True, exist_ok=True)
                pafs.copy_files(info.path, str(local), source_filesystem=self._fs,
                                destination_filesystem=pafs.LocalFileSystem())
            yield target
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _type(self) -> pafs.FileType:
        return self._fs.get_file_info(self._path).type
