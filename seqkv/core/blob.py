"""The seqkv blob container: versioned, self-describing, checksummed.

    magic  b"SEQKV\\0\\r\\n"        8 bytes (the \\r\\n catches text-mode mangling, as PNG's does)
    version                         u16 little-endian
    header length                   u32 little-endian
    header                          UTF-8 JSON: kind, model fingerprint, sizes, section lengths
    sections                        raw bytes, lengths listed in the header
    checksum                        blake2b-256 of everything above

Every reader checks magic, version, lengths and checksum before it trusts a byte, so a
corrupt, truncated, empty or foreign file is refused with one clear message.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

from .errors import BlobError, SeqkvError

MAGIC = b"SEQKV\x00\r\n"
VERSION = 1
_FIXED = struct.Struct("<HI")
_DIGEST = 32
_MAX_HEADER = 64 << 20


def _digest(data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=_DIGEST).digest()


def pack(header: dict, sections: list[bytes]) -> bytes:
    header = {**header, "sections": [len(s) for s in sections]}
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    body = b"".join([MAGIC, _FIXED.pack(VERSION, len(head)), head, *sections])
    return body + _digest(body)


def unpack(data: bytes) -> tuple[dict, list[bytes]]:
    """Header and sections of a blob, or BlobError saying what is wrong with it."""
    if not data:
        raise BlobError("empty blob")
    if len(data) < len(MAGIC):
        raise BlobError("truncated blob" if MAGIC.startswith(data) else "not a seqkv blob")
    if not data.startswith(MAGIC):
        raise BlobError("not a seqkv blob (bad magic)")
    fixed_end = len(MAGIC) + _FIXED.size
    if len(data) < fixed_end + _DIGEST:
        raise BlobError("truncated blob")
    version, head_len = _FIXED.unpack_from(data, len(MAGIC))
    if version != VERSION:
        raise BlobError(
            f"blob format version {version} is not supported (this seqkv reads {VERSION})"
        )
    if head_len > _MAX_HEADER or fixed_end + head_len + _DIGEST > len(data):
        raise BlobError("truncated or corrupt blob (header length)")
    view = memoryview(data)
    if _digest(view[:-_DIGEST]) != bytes(view[-_DIGEST:]):
        # A checksum mismatch with a plausible header is most often a cut-off file.
        raise BlobError("corrupt or truncated blob (checksum mismatch)")
    try:
        header = json.loads(bytes(view[fixed_end : fixed_end + head_len]))
        lengths = [int(n) for n in header["sections"]]
    except (ValueError, KeyError, TypeError) as e:
        raise BlobError("corrupt blob header") from e
    pos = fixed_end + head_len
    if pos + sum(lengths) + _DIGEST != len(data) or any(n < 0 for n in lengths):
        raise BlobError("corrupt blob (section lengths)")
    sections = []
    for n in lengths:
        sections.append(bytes(view[pos : pos + n]))
        pos += n
    return header, sections


def read_file(path: str | os.PathLike, what: str = "file") -> bytes:
    """A file's bytes, or a one-line SeqkvError for a missing path, a directory or an
    unreadable file."""
    p = Path(path)
    if p.is_dir():
        raise SeqkvError(f"is a directory, not a {what}: {path}")
    try:
        return p.read_bytes()
    except FileNotFoundError as e:
        raise SeqkvError(f"no such file: {path}") from e
    except OSError as e:
        raise SeqkvError(f"cannot read {what} {path}: {e.strerror or e}") from e


def read_blob(path: str | os.PathLike) -> bytes:
    """A blob file's bytes (checked when unpacked), or a one-line SeqkvError."""
    return read_file(path, "blob")


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write via a temp file in the same directory, fsync, rename: all or nothing.

    The file gets the mode a plain open() would give it: an existing file's own mode, a new
    one 0o666 less the umask. Errors name ``path``, never the temp file.
    """
    p = Path(path)
    directory = p.parent if str(p.parent) else Path(".")
    if not directory.is_dir():
        raise SeqkvError(f"no such directory: {directory}")
    if p.is_dir():
        raise SeqkvError(f"is a directory: {path}")
    try:
        mode = p.stat().st_mode & 0o777 if p.exists() else 0o666 & ~_umask()
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=directory)
    except OSError as e:
        raise SeqkvError(f"cannot write {path}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise SeqkvError(f"cannot write {path}: {e.strerror or e}") from e
        raise
    _fsync_directory(directory)  # make the rename itself durable


def _umask() -> int:
    """The process's umask; on Linux read without setting it (os.umask is process-wide)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_directory(directory: Path) -> None:
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
