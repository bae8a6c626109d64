"""Where the archive's files live: a local folder or an object store, through fsspec.

A ``Store`` is one archive root. Paths given to it are relative to that root
(``"<agent>/<name>"``). Every method blocks (the archive calls them in a
thread) and every failure but "no such file" is raised as ``ArchiveError``
naming the root URL, the path and what failed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from agentq.eventlog.archive._errors import ArchiveError

T = TypeVar("T")

# Object stores whose first path component is a bucket that must exist: a read
# that finds nothing there is a misconfiguration, not an empty archive.
_BUCKETED = frozenset({"s3", "s3a", "gs", "gcs"})
_LOCAL = frozenset({"file", "local"})


def temp_name(name: str) -> str:
    """The temporary file a local durable write goes through: hidden, and one per
    name, so that a write killed half-way is overwritten by the next one."""
    return f".{name}.tmp"


def is_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


class Store:
    """An archive root on an fsspec filesystem."""

    def __init__(self, fs: Any, root: str, url: str, bucket: str | None = None) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        self.url = url
        self.local = isinstance(fs, LocalFileSystem)
        self._bucket = bucket
        self._bucket_seen = False

    def full(self, path: str) -> str:
        return f"{self.root}/{path}" if path else self.root

    def where(self, path: str) -> str:
        """The URL of ``path``, for messages."""
        return f"{self.url.rstrip('/')}/{path}" if path else self.url

    # -- reads --------------------------------------------------------------

    def get(self, path: str) -> bytes | None:
        """The file's bytes; None when there is no such file."""
        data = self._call(f"reading {path}", path, lambda: self.fs.cat_file(self.full(path)))
        return None if data is None else bytes(data)

    def stamp(self, path: str) -> Hashable | None:
        """A value that changes whenever the file is replaced (its ETag on an object
        store; inode, size and time on a disk); None when there is no such file."""
        info = self._call(f"looking up {path}", path, lambda: self.fs.info(self.full(path)))
        if info is None:
            return None
        etag = info.get("ETag") or info.get("etag")
        if etag:
            return ("etag", str(etag))
        return ("stat", *(str(info.get(key)) for key in ("ino", "size", "mtime")))

    def names(self, folder: str) -> list[str]:
        """The names of the files directly in ``folder`` ("" is the root); [] when
        the folder does not exist."""
        return self._listed(folder, "file")

    def folders(self) -> list[str]:
        """The names of the folders directly under the root."""
        return self._listed("", "directory")

    def _listed(self, folder: str, kind: str) -> list[str]:
        entries = self._call(f"listing {folder or 'the root'}", folder,
                             lambda: self.fs.ls(self.full(folder), detail=True))
        if entries is None:
            return []
        return sorted(entry["name"].rstrip("/").rsplit("/", 1)[-1] for entry in entries
                      if entry.get("type") == kind)

    # -- writes -------------------------------------------------------------

    def put(self, path: str, data: bytes) -> Hashable | None:
        """Write the whole file, replacing any; durable when this returns (a local
        file is written aside, flushed, fsync'ed, renamed over the old one and its
        folder fsync'ed; an object store's PUT has completed). A reader sees the old
        file or the new one, never part of one. Returns the new file's ``stamp``."""
        written = self._call(f"writing {path}", None, lambda: self._write(self.full(path), data))
        # An S3 PUT answers with the ETag a HEAD would give: no HEAD needed.
        etag = written.get("ETag") if isinstance(written, dict) else None
        return ("etag", str(etag)) if etag else self.stamp(path)

    def _write(self, full: str, data: bytes) -> Any:
        if self.local:
            _put_local(full, data)
            return None
        return self.fs.pipe_file(full, data)

    def delete(self, path: str) -> None:
        """Remove the file; nothing when it does not exist."""
        self._call(f"removing {path}", path, lambda: self.fs.rm_file(self.full(path)))

    # -- errors -------------------------------------------------------------

    def _call(self, action: str, missing_ok: str | None, call: Callable[[], T]) -> T | None:
        """``call()``; None when it finds no such file and ``missing_ok`` is given,
        after making sure the bucket itself exists."""
        try:
            result = call()
        except FileNotFoundError as exc:
            if missing_ok is None:
                raise self._error(action, exc) from exc
            self._check_bucket()
            return None
        except ArchiveError:
            raise
        except Exception as exc:
            # fsspec, s3fs and botocore raise many types (OSError, ClientError,
            # connection errors): each becomes one clear ArchiveError.
            raise self._error(action, exc) from exc
        return result

    def _check_bucket(self) -> None:
        if self._bucket is None or self._bucket_seen:
            return
        try:
            self.fs.info(self._bucket)
        except FileNotFoundError as exc:
            raise ArchiveError(f"archive {self.url}: the bucket {self._bucket!r} does not exist",
                               self.url) from exc
        except Exception as exc:
            raise self._error(f"looking up the bucket {self._bucket!r}", exc) from exc
        self._bucket_seen = True

    def _error(self, action: str, exc: BaseException) -> ArchiveError:
        text = str(exc) or type(exc).__name__
        return ArchiveError(f"archive {self.url}: {action} failed: {type(exc).__name__}: {text}",
                            self.url)


def _put_local(final: str, data: bytes) -> None:
    folder = os.path.dirname(final)
    _make_folder(folder)
    temp = os.path.join(folder, temp_name(os.path.basename(final)))
    with open(temp, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temp, final)
    _fsync_folder(folder)


def _make_folder(folder: str) -> None:
    """Create ``folder`` and any missing parent, each new entry made durable in its
    parent (a new file in a folder whose own entry was lost would be lost too)."""
    if os.path.isdir(folder):
        return
    parent = os.path.dirname(folder)
    if parent and parent != folder:
        _make_folder(parent)
    try:
        os.mkdir(folder)
    except FileExistsError:
        return
    _fsync_folder(parent)


def _fsync_folder(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# The environment a filesystem was made under: botocore reads these once, when
# s3fs makes its client.
_ENVIRONMENT = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION",
                "AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")
_filesystems: dict[tuple[str | None, ...], Any] = {}


def _filesystem(protocol: str, cls: Any, url: str) -> Any:
    """One filesystem per protocol and environment, shared by the process's
    archives: making an S3 client costs 0.2-0.4 s. fsspec's own instance cache is
    not used, since it does not see the environment change."""
    key = (protocol, *(os.environ.get(name) for name in _ENVIRONMENT))
    fs = _filesystems.get(key)
    if fs is None:
        options: dict[str, Any] = {"skip_instance_cache": True}
        if protocol in ("s3", "s3a"):
            # Listings are read fresh: another process appends and trims meanwhile.
            options["use_listings_cache"] = False
        try:
            fs = _filesystems[key] = cls(**options)
        except Exception as exc:
            raise ArchiveError(f"archive {url}: cannot open {protocol!r} storage: {exc}",
                               url) from exc
    return fs


def open_store(url: str) -> Store:
    """The store at ``url``: ``file:///abs/path``, a plain path, or
    ``<protocol>://bucket/prefix`` (``s3://`` through s3fs; its endpoint and
    credentials from the usual AWS environment variables, read by botocore)."""
    protocol, rest = fsspec.core.split_protocol(url)
    if protocol is None or protocol in _LOCAL:
        if not rest:
            raise ArchiveError(f"archive {url!r}: no folder given", url)
        path = os.path.abspath(os.path.expanduser(rest))
        return Store(LocalFileSystem(), path, f"file://{path}")
    try:
        cls = fsspec.get_filesystem_class(protocol)
    except (ValueError, ImportError) as exc:
        raise ArchiveError(f"archive {url}: unsupported storage {protocol!r}: {exc}", url) from exc
    root = str(cls._strip_protocol(url)).strip("/")
    if not root:
        raise ArchiveError(f"archive {url}: no bucket given", url)
    fs = _filesystem(protocol, cls, url)
    bucket = root.split("/", 1)[0] if protocol in _BUCKETED else None
    return Store(fs, root, f"{protocol}://{root}", bucket)
