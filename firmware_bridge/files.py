"""What every artifact reader and writer shares.

- ``atomic_path``: write a file under a temporary name beside it, then rename it over the target; the file gets
  the permissions the umask gives a new file (as ``open()`` would), so a lab's shared folders stay shared; a
  temporary file left by a killed writer is removed by the next write to the same target.
- ``read_npz``: read a ``.npz`` without trusting it: every member's declared size is checked against what the
  caller expects *before* anything is decompressed (no zip bombs), arrays are parsed from their ``.npy`` headers
  (no pickled objects, ever), and every failure is an ``ArtifactError`` naming the file and the member.
- ``text_sha256`` / ``check_manifest_hash``: a manifest (the JSON text of an artifact) is covered by a SHA-256
  stored beside it.
- ``package_version``: the software version for provenance.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # typing.Self is 3.11+; the board runs 3.10 (annotations are strings, never evaluated)
    from typing_extensions import Self  # noqa: UP035

from cimlab.firmware_bridge.errors import ArtifactError

TEMP_SUFFIX = ".tmp"


def package_version() -> str:
    """The installed cimlab version ("0+unknown" when run from an uninstalled tree)."""
    try:
        return metadata.version("cimlab")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove_stale_temporaries(target: Path) -> None:
    """Temporary files of earlier writes to ``target`` whose writer is gone (killed): they are ours to remove."""
    for stale in target.parent.glob(f".{target.name}.*{TEMP_SUFFIX}"):
        pid = stale.name[len(target.name) + 2 : -len(TEMP_SUFFIX)].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; when the block succeeds, sync it and rename it over ``target``.

    A reader sees either the old file or the whole new one, never a half-written one; on any error (Ctrl-C
    included) the temporary file is removed and ``target`` is untouched. The parent folder is created if missing.
    The new file's mode is what the umask gives (0644 under the usual 022), not ``mkstemp``'s private 0600; the
    temporary name holds the writer's process id, so a later write removes what a killed writer left.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=TEMP_SUFFIX, dir=target.parent)
    tmp = Path(name)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # after the writer: some (safetensors) write a private file of their own
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---- reading untrusted .npz files ----------------------------------------------------------------------------------
MAX_MEMBERS = 100_000
"""Most members a .npz may list."""


def text_sha256(text: str) -> str:
    """SHA-256 of a manifest's UTF-8 text, hex."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_manifest_hash(where: str, text: str, stored: object, field: str) -> None:
    """ArtifactError unless ``stored`` is the SHA-256 of ``text`` (the manifest is what was written)."""
    if not isinstance(stored, str) or stored != text_sha256(text):
        raise ArtifactError(f"{where}: {field} does not match the manifest's SHA-256 (corrupt or edited file)")


def parse_manifest(where: str, text: str, stored_hash: object, hash_field: str, *, fmt: str, version: int,
                   what: str = "manifest") -> dict[str, Any]:
    """A manifest's JSON object: its SHA-256 checked against ``stored_hash`` (field ``hash_field``), its ``format``
    and ``version`` the expected ones (``what`` names the artifact in the version error); ArtifactError otherwise."""
    check_manifest_hash(where, text, stored_hash, hash_field)
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise ArtifactError(f"{where}: the manifest is not JSON: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        raise ArtifactError(f"{where}: manifest format is not {fmt!r}")
    if manifest.get("version") != version:
        raise ArtifactError(f"{where}: {what} version {manifest.get('version')!r} is not supported ({version})")
    return manifest


class NpzReader:
    """An open ``.npz`` whose members are read one at a time, each only after its declared size is checked.

    Args:
        path: the file.
        what: how to name it in errors (``"error model"``, ``"package"``).
        max_file_bytes: refuse larger files outright.
    """

    def __init__(self, path: str | os.PathLike, what: str, *, max_file_bytes: int) -> None:
        self.path = Path(path)
        self.where = f"{what} {str(self.path)!r}"
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise ArtifactError(f"{self.where}: no such file") from None
        except OSError as err:
            raise ArtifactError(f"{self.where}: cannot be read: {err.strerror or err}") from err
        if size > max_file_bytes:
            raise ArtifactError(f"{self.where}: {size:,} bytes, more than the {max_file_bytes:,} allowed")
        try:
            self._zip = zipfile.ZipFile(self.path)
            infos = self._zip.infolist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as err:
            raise ArtifactError(f"{self.where}: not a readable .npz (zip) file: {err}") from err
        if len(infos) > MAX_MEMBERS:
            self.close()
            raise ArtifactError(f"{self.where}: {len(infos):,} members, more than {MAX_MEMBERS:,}")
        self.members: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            if not info.filename.endswith(".npy") or info.filename[:-4] in self.members:
                self.close()
                raise ArtifactError(f"{self.where}: member {info.filename!r} is not one .npy array")
            self.members[info.filename[:-4]] = info

    @property
    def names(self) -> list[str]:
        """The arrays' names."""
        return list(self.members)

    def declared_bytes(self, name: str) -> int:
        """Uncompressed size the zip declares for member ``name`` (nothing is decompressed)."""
        return int(self.members[name].file_size)

    def read(self, name: str, *, max_bytes: int, expect: Callable[[np.dtype, tuple[int, ...]], str | None]
             | None = None) -> np.ndarray:
        """Array ``name``: its declared size must be at most ``max_bytes`` (checked before decompressing), its
        header a plain (non-object) dtype, and ``expect(dtype, shape)`` (when given) must return None, else the
        text of what is wrong."""
        where = f"{self.where}: array {name!r}"
        info = self.members.get(name)
        if info is None:
            raise ArtifactError(f"{self.where}: missing array {name!r} (has: {sorted(self.members)})")
        if info.file_size > max_bytes:
            raise ArtifactError(f"{where} declares {info.file_size:,} bytes, more than the {max_bytes:,} expected")
        try:
            with self._zip.open(info) as f:
                data = f.read(info.file_size + 1)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, RuntimeError) as err:
            raise ArtifactError(f"{where}: cannot be decompressed: {err}") from err
        except Exception as err:  # zlib.error and other decompressor errors have no common base class
            raise ArtifactError(f"{where}: cannot be decompressed: {type(err).__name__}: {err}") from err
        if len(data) > info.file_size:
            raise ArtifactError(f"{where}: more data than its declared {info.file_size:,} bytes")
        return _parse_npy(where, data, expect)

    def close(self) -> None:
        """Close the file."""
        self._zip.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse_npy(where: str, data: bytes, expect: Callable[[np.dtype, tuple[int, ...]], str | None] | None
               ) -> np.ndarray:
    import io

    from numpy.lib import format as npy

    f = io.BytesIO(data)
    try:
        version = npy.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = npy.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = npy.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except Exception as err:  # numpy raises ValueError, SyntaxError or others on a malformed header
        raise ArtifactError(f"{where}: not a .npy array: {type(err).__name__}: {err}") from err
    if dtype.hasobject or dtype.kind in "OV":
        raise ArtifactError(f"{where}: dtype {dtype} holds objects; cimlab files hold plain numbers and text only")
    problem = expect(dtype, tuple(shape)) if expect is not None else None
    if problem:
        raise ArtifactError(f"{where}: {problem}")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    body = data[f.tell():]
    if len(body) != count * dtype.itemsize:
        raise ArtifactError(f"{where}: {len(body):,} data bytes for shape {list(shape)} of {dtype} "
                            f"({count * dtype.itemsize:,} expected)")
    arr = np.frombuffer(body, dtype=dtype, count=count)
    return arr.reshape(shape, order="F" if fortran else "C")


def read_text_member(reader: NpzReader, name: str, *, max_chars: int) -> str:
    """A 0-d text array (a JSON manifest) of at most ``max_chars`` characters, as a str."""
    def expect(dtype: np.dtype, shape: tuple[int, ...]) -> str | None:
        if shape != () or dtype.kind not in "US":
            return f"must be a 0-d text array, got {dtype} {list(shape)}"
        return None

    arr = reader.read(name, max_bytes=4 * max_chars + 256, expect=expect)
    value = arr.item()
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ArtifactError(f"{reader.where}: array {name!r} is not UTF-8 text: {err}") from err
    return str(value)


@contextmanager
def manifest_field(where: str, name: str) -> Iterator[None]:
    """Errors while reading manifest field ``name`` become an ArtifactError naming the file and the field."""
    try:
        yield
    except ArtifactError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError, RecursionError) as err:
        raise ArtifactError(f"{where}: manifest field {name!r} is malformed: {type(err).__name__}: {err}") from err


def require_types(where: str, obj: object, fields: dict[str, type | tuple[type, ...]], prefix: str = "") -> None:
    """ArtifactError unless ``obj`` is a JSON object whose ``fields`` exist with the given types."""
    if not isinstance(obj, dict):
        raise ArtifactError(f"{where}: {prefix or 'the manifest'} must be a JSON object, got {type(obj).__name__}")
    for key, typ in fields.items():
        if key not in obj:
            raise ArtifactError(f"{where}: manifest lacks '{prefix}{key}'")
        value = obj[key]
        bad_bool = isinstance(value, bool) and bool not in (typ if isinstance(typ, tuple) else (typ,))
        if bad_bool or not isinstance(value, typ):
            names = "/".join(t.__name__ for t in (typ if isinstance(typ, tuple) else (typ,)))
            raise ArtifactError(f"{where}: manifest field '{prefix}{key}' must be {names}, got {value!r:.60}")
