"""Where bytes live: a local folder or any URI pyarrow understands (s3:// honours
AWS_ENDPOINT_URL_S3 and the usual AWS_* variables).

Every operation turns storage failures (bad credentials, unreachable endpoint, missing bucket)
into one-line `BpfmError`s that name the URI and the problem, never a secret."""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from bpfm.errors import BpfmError
from bpfm.io.atomic import publish_file
from bpfm.io.redact import redact

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")

# Substrings of pyarrow/AWS error messages -> what the user should check.
_HINTS = (
    (("SIGNATURE_DOES_NOT_MATCH", "SignatureDoesNotMatch"),
     "credentials rejected (check AWS_SECRET_ACCESS_KEY)"),
    (("INVALID_ACCESS_KEY_ID", "InvalidAccessKeyId"),
     "credentials rejected (check AWS_ACCESS_KEY_ID)"),
    (("ACCESS_DENIED", "AccessDenied", "Forbidden"),
     "access denied: credentials rejected or not allowed (check AWS_ACCESS_KEY_ID / "
     "AWS_SECRET_ACCESS_KEY and the bucket policy)"),
    (("NO_SUCH_BUCKET", "NoSuchBucket", "Bucket does not exist"), "bucket does not exist"),
    (("Couldn't connect", "curlCode: 7", "Connection refused", "NETWORK_CONNECTION",
      "Could not resolve", "curlCode: 6", "curlCode: 28", "Timeout"),
     "cannot reach the S3 endpoint (check AWS_ENDPOINT_URL_S3 and the network)"),
    (("No response body", "MISSING_AUTHENTICATION", "credentials"),
     "request refused (check the AWS_* credential variables)"),
)


def is_local(uri: str | Path) -> bool:
    return isinstance(uri, Path) or not _SCHEME.match(uri) or uri.startswith("file://")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI or a local path with '/'."""
    out = str(uri).rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def describe_error(uri: str, err: BaseException) -> str:
    """One line naming the URI and the problem; the raw message only when nothing matches."""
    raw = " ".join(str(err).split())
    for needles, hint in _HINTS:
        if any(needle in raw for needle in needles):
            return redact(f"{uri}: {hint}")
    if isinstance(err, FileNotFoundError):
        return redact(f"{uri}: not found")
    return redact(f"{uri}: {raw[:300]}")


@contextlib.contextmanager
def storage_errors(uri: str) -> Iterator[None]:
    """Re-raise OSError / Arrow errors from a storage operation as a one-line BpfmError."""
    try:
        yield
    except BpfmError:
        raise
    except (OSError, pa.ArrowException) as err:
        raise BpfmError(describe_error(uri, err)) from None


def filesystem_for(uri: str | Path) -> tuple[pafs.FileSystem, str]:
    """A pyarrow FileSystem and the path inside it for a local path, file:// or s3:// URI."""
    if is_local(uri):
        text = str(uri).removeprefix("file://")
        return pafs.LocalFileSystem(), str(Path(text).expanduser().absolute())
    with storage_errors(str(uri)):
        fs, path = pafs.FileSystem.from_uri(str(uri))
    return fs, path.rstrip("/")


def _make_parent(fs: pafs.FileSystem, path: str) -> None:
    """Local folders must exist before a write; object stores have none (pyarrow would write
    empty `dir/` marker objects)."""
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)


def exists(uri: str) -> bool:
    fs, path = filesystem_for(uri)
    with storage_errors(uri):
        return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str, attempts: int = 5) -> bytes:
    """The whole file, as one version of it.

    pyarrow reads an S3 object with a HEAD for its size and then a GET of that many bytes. An
    object replaced in between (`publish_bytes` by another process) would come back as the first
    bytes of a longer new version, or a shorter one padded with zeros: so a read whose length
    differs from the object's size afterwards is read again."""
    fs, path = filesystem_for(uri)
    for _ in range(attempts):
        with storage_errors(uri):
            with fs.open_input_stream(path) as stream:
                data = stream.read()
            if fs.get_file_info(path).size == len(data):
                return data
    raise BpfmError(f"{uri}: the file changed while being read, {attempts} times in a row")


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = filesystem_for(uri)
    with storage_errors(uri):
        _make_parent(fs, path)
        with fs.open_output_stream(path) as stream:
            stream.write(data)


def publish_bytes(uri: str, data: bytes) -> None:
    """Write a file so that readers see either the old content or the new, never a part.

    Locally: `bpfm.io.atomic.publish_file` (a full disk is one line naming the file and the
    bytes it needed). On object stores a single upload only becomes visible once complete, so a
    plain write is already atomic."""
    if not is_local(uri):
        write_bytes(uri, data)
        return
    _, path = filesystem_for(uri)
    with storage_errors(uri):
        publish_file(Path(path), lambda temp: temp.write_bytes(data), len(data))


def delete_dir(uri: str, *, missing_ok: bool = True) -> None:
    fs, path = filesystem_for(uri)
    with storage_errors(uri):
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            if missing_ok:
                return
            raise FileNotFoundError(path)
        fs.delete_dir(path)


def list_dir(uri: str) -> list[str]:
    """Names directly under a folder (files and sub-folders); empty when it does not exist."""
    fs, path = filesystem_for(uri)
    with storage_errors(uri):
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(info.base_name for info in infos)


class HashingWriter:
    """A write-only file object over a pyarrow output stream that tracks size and sha256, so a
    file's checksum comes for free while it is written (no second read, locally or on S3).
    With `block_bytes`, it also hashes each block of that many bytes (the last one shorter): a
    node cache can then check a part block by block as it lands (`bpfm.data.cache`)."""

    def __init__(self, stream: pa.NativeFile, block_bytes: int | None = None):
        self._stream = stream
        self._sha256 = hashlib.sha256()
        self._block_bytes = block_bytes
        self._block = hashlib.sha256()
        self._block_size = 0
        self.block_sha256: list[str] = []
        self.size = 0
        self.closed = False

    def write(self, data: bytes) -> int:
        view = memoryview(data).cast("B")
        self._sha256.update(view)
        if self._block_bytes:
            self._hash_blocks(view)
        self._stream.write(view)
        self.size += view.nbytes
        return view.nbytes

    def _hash_blocks(self, view: memoryview) -> None:
        while view.nbytes:
            take = min(view.nbytes, self._block_bytes - self._block_size)
            self._block.update(view[:take])
            self._block_size += take
            view = view[take:]
            if self._block_size == self._block_bytes:
                self.block_sha256.append(self._block.hexdigest())
                self._block, self._block_size = hashlib.sha256(), 0

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        """Nothing to do: the underlying stream flushes on close."""

    def close(self) -> None:
        if not self.closed:
            self._stream.close()
            if self._block_size:
                self.block_sha256.append(self._block.hexdigest())
            self.closed = True

    def hexdigest(self) -> str:
        return self._sha256.hexdigest()


def open_hashed_output(
    fs: pafs.FileSystem, path: str, block_bytes: int | None = None
) -> HashingWriter:
    """Open `path` for writing (parents created) behind a HashingWriter."""
    _make_parent(fs, path)
    return HashingWriter(fs.open_output_stream(path), block_bytes)


def sha256_file(
    path: str | Path, block: int = 8 << 20, poll: Callable[[], None] | None = None,
    fs: pafs.FileSystem | None = None,
) -> str:
    """sha256 of a file, streamed (hashlib releases the GIL, so threads hash in parallel): a
    local path, or a path in `fs`. `poll` is called every block: it raises to stop
    (`bpfm.io.interrupts.check`)."""
    digest = hashlib.sha256()
    with (fs.open_input_stream(str(path)) if fs is not None else open(path, "rb")) as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
            if poll is not None:
                poll()
    return digest.hexdigest()
