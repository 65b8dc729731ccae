"""Read, write and validate the laser-heat-treatment data-set format.

Layout (see ``docs/dataset.md``)::

    ROOT/TypeN/NNNN.npz        array under key ``image``: (frames, rows, cols) difference video
    ROOT/TypeN/metadata.pkl    pickle: {"NNNN": {Index, KeyfIniObstacle1, ..., SizeInFrames}}
    ROOT/labels.csv            simulator only: type,video,kind,onset_frame,end_frame,magnitude
    ROOT/truth/TypeN/NNNN.npz  simulator only: true spot path (never read by the readers)

Shapes follow the seed's formulas: rows = InfBordPx - SupBordPx + 1,
cols = RightBordPx - LeftBordPx + 1, frames = SizeInFrames (the seed calls the
right/bottom borders "exclusive" yet gives these formulas; we follow the formulas).

``metadata.pkl`` is read with a restricted, counted unpickler (`lhtstream.io.safe_pickle`)
that only admits plain containers, strings, numbers, booleans, None and numpy numeric
scalars, so a hostile pickle cannot run code or grow without bound. Every reader is
bounded before it allocates: metadata fields are checked against FIELD_RANGES before a
shape is used, and an npz's zip directory and .npy header before anything is inflated.
Nothing here loads more than one video at a time.
"""

from __future__ import annotations

import csv
import math
import os
import pickle
import re
import stat
import struct
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from numpy.lib import format as npformat

from lhtstream.base.errors import LhtstreamError
from lhtstream.base.selection import N_TYPES
from lhtstream.io.safe_pickle import load_plain

METADATA_FIELDS: tuple[str, ...] = (
    "Index",
    "KeyfIniObstacle1",
    "KeyfEndObstacle1",
    "KeyfIniObstacle2",
    "KeyfEndObstacle2",
    "LeftBordPx",
    "RightBordPx",
    "SupBordPx",
    "InfBordPx",
    "SizeInFrames",
)
SENSOR_SIZE = 32  # the camera is 32x32 px; ROI borders index into it
MAX_VALUE = 1024  # camera range 0..1024
MAX_METADATA_BYTES = 64 * 1024 * 1024  # a real metadata.pkl is a few hundred KB
MAX_LABELS_BYTES = 16 * 1024 * 1024  # labels.csv (4,223 videos: ~150 KB)
MAX_METADATA_ITEMS = 200_000  # videos + fields in one metadata.pkl (the whole real set: ~46,000)
MAX_FIELDS = 64  # fields of one video's entry (real: 10)
MAX_NAME_CHARS = 64  # video and field names, and any string value
MAX_IMAGE_BYTES = 256 * 1024 * 1024  # one video's decompressed array (15,000 x 20 x 26 u2: 16 MB)
MAX_NPZ_MEMBERS = 16  # members of one npz (numpy writes 1)
MAX_NPZ_DIRECTORY_BYTES = 64 * 1024  # its zip central directory (numpy writes ~100 bytes)
_EOCD_SEARCH = 22 + 65535 + 56 + 20  # end record + longest comment + ZIP64 record and locator
MAX_FRAMES = 1_000_000  # SizeInFrames: 1000 s at 1 kHz (real videos average ~15,000 frames)
LABEL_COLUMNS = ("type", "video", "kind", "onset_frame", "end_frame", "magnitude")
RAMP_COLUMN = "ramp_frames"  # optional: written only when some fault ramps (synth --ramp-frames)

_TYPE_DIR = re.compile(r"Type([0-9]+)")  # fullmatch: no trailing newline, ASCII digits
_VIDEO_FILE = re.compile(r"([0-9]+)\.npz")


class DatasetError(LhtstreamError, ValueError):
    """A data-set file is missing, malformed or unsafe; the message names file, video and field."""


# ---------------------------------------------------------------- metadata


def _plain_value(value: Any) -> Any:
    """numpy numbers -> Python numbers; integral floats stay floats (validate reports them)."""
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


def _show(value: Any) -> str:
    """A short repr for messages: a hostile value can be a 64 MB string or a 10^6-digit int."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"<{'-' if value < 0 else ''}integer of {value.bit_length()} bits>"
    if isinstance(value, (str, bytes)) and len(value) > MAX_NAME_CHARS:
        return f"{value[:MAX_NAME_CHARS]!r}... ({len(value)} long)"
    if isinstance(value, (str, bytes, int, float, bool, type(None))):
        return repr(value)
    return f"<{type(value).__name__}>"


def _is_name(value: Any) -> bool:
    """A video or field name: a short printable string (it is printed in one-line messages)."""
    return isinstance(value, str) and len(value) <= MAX_NAME_CHARS and value.isprintable()


def _plain_metadata(raw: Any, path: Path) -> dict[str, dict[str, Any]]:
    """``raw`` as fresh flat dicts of scalars, or DatasetError; never more than
    MAX_METADATA_ITEMS videos plus fields, a shared entry counted each time it is used."""
    if not isinstance(raw, dict):
        raise DatasetError(f"{path}: metadata is a {type(raw).__name__}, expected a dict of videos")
    budget = MAX_METADATA_ITEMS - len(raw)
    out: dict[str, dict[str, Any]] = {}
    for name, entry in raw.items():
        if not _is_name(name):
            raise DatasetError(f"{path}: metadata key {_show(name)} is not a video name string")
        if not isinstance(entry, dict):
            raise DatasetError(
                f"{path}: video {name}: metadata entry is a {type(entry).__name__}, expected a dict"
            )
        if len(entry) > MAX_FIELDS:
            raise DatasetError(
                f"{path}: video {name}: metadata entry has {len(entry)} fields, over {MAX_FIELDS}"
            )
        budget -= len(entry)
        if budget < 0:
            raise DatasetError(
                f"{path}: metadata holds over {MAX_METADATA_ITEMS} videos and fields "
                "(an entry used more than once counts each time)"
            )
        fields = {}
        for key, value in entry.items():
            if not _is_name(key):
                raise DatasetError(f"{path}: video {name}: field name {_show(key)} is not a string")
            value = _plain_value(value)
            if not isinstance(value, (int, float, type(None), str, bytes)) or (
                isinstance(value, (str, bytes)) and len(value) > MAX_NAME_CHARS
            ):
                raise DatasetError(
                    f"{path}: video {name}: metadata field {key} = {_show(value)} is not a number"
                )
            fields[key] = value
        out[name] = fields
    return out


def load_metadata(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Read a ``metadata.pkl`` safely: ``{video name: {field: int}}``.

    Raises DatasetError (naming the file) when the file is missing, too large,
    not a pickle, uses anything but plain data, is not a dict of flat dicts of
    scalars, or is over the bounds (`MAX_METADATA_BYTES`, `MAX_PICKLE_OPS`,
    `MAX_METADATA_ITEMS`, `MAX_FIELDS`, `MAX_NAME_CHARS`). Field values are returned
    as Python numbers; `check_entry` and `validate` check them.
    """
    path = Path(path)
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):  # opening a FIFO blocks; /dev/zero never ends
            raise DatasetError(f"{path}: metadata is not a regular file")
        if info.st_size > MAX_METADATA_BYTES:
            raise DatasetError(f"{path}: metadata file is {info.st_size} bytes, over the "
                               f"{MAX_METADATA_BYTES} limit")
        with path.open("rb") as fh:
            data = fh.read(MAX_METADATA_BYTES + 1)  # bounded even if it grew meanwhile
    except FileNotFoundError:
        raise DatasetError(f"{path}: metadata file missing") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read metadata: {exc.strerror or exc}") from None
    try:
        raw = load_plain(data)
    except pickle.UnpicklingError as exc:
        raise DatasetError(f"{path}: unsafe or unreadable metadata pickle ({exc})") from None
    except Exception as exc:  # truncated / garbage pickles raise many types
        raise DatasetError(
            f"{path}: unreadable metadata pickle ({type(exc).__name__}: {str(exc):.200})"
        ) from None
    return _plain_metadata(raw, path)


def save_metadata(path: str | os.PathLike, metadata: dict[str, dict[str, int]]) -> None:
    """Write ``metadata.pkl`` as plain dicts of Python ints (atomic replace)."""
    path = Path(path)
    plain = {
        str(name): {k: int(v) if isinstance(v, (int, np.integer)) else v for k, v in entry.items()}
        for name, entry in metadata.items()
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(pickle.dumps(plain, protocol=4))
    os.replace(tmp, path)


# ---------------------------------------------------------------- videos


#: Inclusive range of each metadata field; every reader checks a field before using it.
FIELD_RANGES: dict[str, tuple[int, int]] = {
    "Index": (1, N_TYPES),
    **{f"Keyf{end}Obstacle{n}": (-1, MAX_FRAMES - 1) for n in (1, 2) for end in ("Ini", "End")},
    **{border: (0, SENSOR_SIZE - 1)
       for border in ("LeftBordPx", "RightBordPx", "SupBordPx", "InfBordPx")},
    "SizeInFrames": (1, MAX_FRAMES),
}
_BORDER_PAIRS = (("LeftBordPx", "RightBordPx"), ("SupBordPx", "InfBordPx"))


def _field(meta: dict[str, Any], key: str) -> tuple[int | None, str | None]:
    """(value, None) when field ``key`` is an integer within FIELD_RANGES, else (None, problem)."""
    if key not in meta:
        return None, f"metadata field {key} missing"
    value = meta[key]
    if isinstance(value, float) and value.is_integer():  # False for NaN and inf
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        return None, f"metadata field {key} = {_show(meta[key])} is not an integer"
    lo, hi = FIELD_RANGES[key]
    if not lo <= value <= hi:
        return None, f"metadata field {key} = {_show(meta[key])} is not {lo} <= {key} <= {hi}"
    return value, None


def _int_field(meta: dict[str, Any], key: str, where: str) -> int:
    value, problem = _field(meta, key)
    if value is None:
        raise DatasetError(f"{where}: {problem}")
    return value


def entry_problems(meta: dict[str, Any], where: str) -> list[str]:
    """What makes a video's metadata entry unusable to every reader, one line each: a field
    missing, not an integer or out of FIELD_RANGES, or a right/bottom border before its left/top.
    (`validate` also reports what readers tolerate: unknown fields, Index vs folder, windows.)"""
    values: dict[str, int] = {}
    problems = []
    for key in METADATA_FIELDS:
        value, problem = _field(meta, key)
        if value is None:
            problems.append(f"{where}: {problem}")
        else:
            values[key] = value
    for lo, hi in _BORDER_PAIRS:
        if lo in values and hi in values and values[lo] > values[hi]:
            problems.append(_border_problem(values, lo, hi, where))
    return problems


def _border_problem(values: dict[str, int], lo: str, hi: str, where: str) -> str:
    return (f"{where}: metadata fields {lo}={values[lo]}, {hi}={values[hi]} "
            f"are not 0 <= {lo} <= {hi} < {SENSOR_SIZE}")


def check_entry(meta: dict[str, Any], where: str) -> None:
    """DatasetError with the first of `entry_problems` (and how many more) when there is one."""
    problems = entry_problems(meta, where)
    if problems:
        more = len(problems) - 1
        raise DatasetError(problems[0] + (f" (and {more} more: see lhtstream validate)"
                                          if more else ""))


def expected_shape(meta: dict[str, Any], where: str = "video") -> tuple[int, int, int]:
    """(frames, rows, cols) from a metadata entry by the seed's formulas (fields checked)."""
    frames = _int_field(meta, "SizeInFrames", where)
    px = {key: _int_field(meta, key, where) for pair in _BORDER_PAIRS for key in pair}
    for lo, hi in _BORDER_PAIRS:
        if px[lo] > px[hi]:
            raise DatasetError(_border_problem(px, lo, hi, where))
    return frames, px["InfBordPx"] - px["SupBordPx"] + 1, px["RightBordPx"] - px["LeftBordPx"] + 1


def obstacle_windows(meta: dict[str, Any], where: str = "video") -> list[tuple[int, int]]:
    """Inclusive (first, last) frame of each obstacle window present (-1 means absent)."""
    return [(ini, end) for ini, end in _windows_by_number(meta, where) if ini >= 0 and end >= 0]


def obstacle_states(meta: dict[str, Any], where: str = "video") -> np.ndarray:
    """(SizeInFrames,) int8 per frame: 0 outside windows, n inside window n (inclusive)."""
    frames = _int_field(meta, "SizeInFrames", where)
    states = np.zeros(frames, dtype=np.int8)
    for n, (ini, end) in enumerate(_windows_by_number(meta, where), start=1):
        if ini >= 0 and end >= 0:
            states[ini : end + 1] = n
    return states


def _windows_by_number(meta: dict[str, Any], where: str) -> list[tuple[int, int]]:
    """(KeyfIniObstacleN, KeyfEndObstacleN) for N = 1, 2, absent ones included (-1)."""
    return [
        (
            _int_field(meta, f"KeyfIniObstacle{n}", where),
            _int_field(meta, f"KeyfEndObstacle{n}", where),
        )
        for n in (1, 2)
    ]


def _check_image(arr: np.ndarray, where: str) -> np.ndarray:
    """Return ``arr`` as uint16 or raise: numeric, integral, within 0..1024."""
    kind = arr.dtype.kind
    if kind not in "iuf" or arr.dtype.hasobject:
        raise DatasetError(
            f"{where}: image has dtype {arr.dtype}, expected integer values 0..{MAX_VALUE}"
        )
    if arr.size:
        lo, hi = arr.min(), arr.max()
        if kind == "f" and not np.isfinite(arr).all():
            raise DatasetError(f"{where}: image has non-finite values")
        if lo < 0 or hi > MAX_VALUE:
            raise DatasetError(f"{where}: image values span {lo}..{hi}, outside 0..{MAX_VALUE}")
        if kind == "f" and not np.array_equal(arr, np.round(arr)):
            raise DatasetError(f"{where}: image has non-integer values (dtype {arr.dtype})")
    if arr.dtype == np.uint16 and arr.flags.c_contiguous:
        return arr
    return np.ascontiguousarray(arr, dtype=np.uint16)


def zip_directory_size(fh: BinaryIO) -> tuple[int, int] | None:
    """(entries, bytes) of a zip's central directory, read from its end records without
    parsing it (`zipfile` costs ~0.6 KB and 20 µs per entry: a 500 MB file of empty entries
    would take GBs); None when ``fh`` is no zip (zipfile then says so). Every reader of an
    npz from outside (videos, model files) bounds these before opening it."""
    size = fh.seek(0, os.SEEK_END)
    fh.seek(max(0, size - _EOCD_SEARCH))
    tail = fh.read()
    fh.seek(0)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) < at + 22:
        return None
    entries, dir_bytes = struct.unpack_from("<HI", tail, at + 10)
    # As zipfile does: a ZIP64 locator right before the end record, and the ZIP64 record
    # right before that, override the end record's counts whatever those say.
    z64 = at - 20 - 56
    if z64 >= 0 and tail[at - 20 : at - 16] == b"PK\x06\x07" and tail[z64 : z64 + 4] == (
        b"PK\x06\x06"
    ):
        entries, dir_bytes = struct.unpack_from("<QQ", tail, z64 + 32)
    return int(entries), int(dir_bytes)


def _zip_directory(fh: BinaryIO, where: str) -> None:
    """Refuse a video npz whose zip directory is over `MAX_NPZ_MEMBERS` /
    `MAX_NPZ_DIRECTORY_BYTES` before `zipfile` parses it."""
    entries, dir_bytes = zip_directory_size(fh) or (0, 0)
    if entries > MAX_NPZ_MEMBERS or dir_bytes > MAX_NPZ_DIRECTORY_BYTES:
        raise DatasetError(
            f"{where}: npz holds {entries} members in a {dir_bytes}-byte directory, over "
            f"{MAX_NPZ_MEMBERS} members or {MAX_NPZ_DIRECTORY_BYTES} bytes"
        )


def _image_header(
    zf: zipfile.ZipFile, where: str, shape: tuple[int, int, int] | None
) -> zipfile.ZipInfo:
    """The ``image`` member, its .npy header checked (3-D, numeric dtype, size bound, ``shape``,
    the member's declared length) from the first bytes of its stream: nothing decompressed."""
    names = zf.namelist()
    member = next((n for n in ("image.npy", "image") if n in names), None)
    if member is None:
        has = sorted(n.removesuffix(".npy") for n in names[:10])
        raise DatasetError(f"{where}: no 'image' array in npz (has {has})")
    info = zf.getinfo(member)
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        # what numpy writes; zipfile inflates bzip2 and lzma chunks without a length bound,
        # so 4 KB of bzip2 can become GBs before the first header byte is returned
        raise DatasetError(f"{where}: npz member {member} uses zip compression method "
                           f"{info.compress_type}; numpy writes only 0 (stored) or 8 (deflated)")
    with zf.open(info) as fh:
        version = npformat.read_magic(fh)
        read_header = (npformat.read_array_header_1_0 if version == (1, 0)
                       else npformat.read_array_header_2_0)  # 3.0 differs only in encoding
        header_shape, _fortran, dtype = read_header(fh)
        header_bytes = fh.tell()
    got = tuple(header_shape)
    if dtype.kind not in "iuf" or dtype.hasobject:
        raise DatasetError(
            f"{where}: image has dtype {dtype}, expected integer values 0..{MAX_VALUE}"
        )
    if len(got) != 3:
        raise DatasetError(f"{where}: image has {len(got)} dimensions {got}, expected 3")
    if shape is not None and got != shape:
        raise DatasetError(
            f"{where}: image shape {got} does not match metadata "
            f"(SizeInFrames, InfBordPx-SupBordPx+1, RightBordPx-LeftBordPx+1) = {shape}"
        )
    data_bytes = got[0] * got[1] * got[2] * dtype.itemsize  # Python ints: no overflow
    if data_bytes > MAX_IMAGE_BYTES:
        raise DatasetError(
            f"{where}: image declares shape {got} of {dtype} = {data_bytes} bytes, over the "
            f"{MAX_IMAGE_BYTES}-byte limit"
        )
    if info.file_size != header_bytes + data_bytes:
        raise DatasetError(
            f"{where}: corrupt npz: member {member} is {info.file_size} bytes, its header "
            f"declares {header_bytes} + {data_bytes}"
        )
    return info


def read_image(
    path: str | os.PathLike, where: str | None = None, shape: tuple[int, int, int] | None = None
) -> np.ndarray:
    """The ``image`` array of one npz; DatasetError on any failure.

    Bounded before it allocates: the zip's directory, then the member's .npy header
    (3-D, numeric, at most MAX_IMAGE_BYTES, equal to ``shape`` = (frames, rows, cols)
    when given, matching the member's declared length) are checked before any data is
    decompressed, and no more than that length is ever decompressed.
    """
    path = Path(path)
    where = where or str(path)
    try:
        with path.open("rb") as fh:
            _zip_directory(fh, where)
            with zipfile.ZipFile(fh) as zf:
                info = _image_header(zf, where, shape)
                with zf.open(info) as member:
                    return npformat.read_array(member, allow_pickle=False)
    except DatasetError:
        raise
    except FileNotFoundError:
        raise DatasetError(f"{where}: file missing") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, KeyError,
            zlib.error, RuntimeError) as exc:  # RuntimeError: an encrypted member
        raise DatasetError(
            f"{where}: corrupt or truncated npz ({type(exc).__name__}: {str(exc):.200})"
        ) from None


@dataclass(frozen=True)
class Video:
    """One video of the data set; nothing is read until `load`."""

    type: int
    name: str
    path: Path
    metadata: dict[str, Any] = field(repr=False)

    @property
    def where(self) -> str:
        return f"{self.path} (Type{self.type} video {self.name})"

    @property
    def shape(self) -> tuple[int, int, int]:
        """(frames, rows, cols) the metadata promises."""
        return expected_shape(self.metadata, self.where)

    def load(self) -> np.ndarray:
        """(frames, rows, cols) uint16 difference video, checked against the metadata
        (the shape before anything is decompressed, see `read_image`)."""
        return _check_image(read_image(self.path, self.where, self.shape), self.where)

    def obstacle_states(self) -> np.ndarray:
        """(frames,) int8: 0 outside windows, n inside window n (KeyfIni <= f <= KeyfEnd)."""
        return obstacle_states(self.metadata, self.where)


def _type_dirs(path: Path) -> list[tuple[int, Path]]:
    """(type, folder) of ``path`` itself or of its TypeN children; DatasetError for a TypeN
    folder outside Type1..Type36 (or spelt Type03), which no model or reader can use."""
    candidates = [path] if _TYPE_DIR.fullmatch(path.name) else sorted(path.iterdir())
    found = []
    for child in candidates:
        m = _TYPE_DIR.fullmatch(child.name)
        if not (m and child.is_dir()):
            continue
        type_id = int(m.group(1))
        if not 1 <= type_id <= N_TYPES or child.name != f"Type{type_id}":
            raise DatasetError(f"{child}: not a type folder: types are Type1..Type{N_TYPES}")
        found.append((type_id, child))
    return sorted(found)


def _video_files(folder: Path) -> list[tuple[str, Path]]:
    out = []
    for child in folder.iterdir():
        m = _VIDEO_FILE.fullmatch(child.name)
        if m and child.is_file():
            out.append((m.group(1), child))
    return sorted(out, key=lambda item: (int(item[0]), item[0]))


class Dataset:
    """A data-set root holding ``TypeN/`` folders, or a single ``TypeN`` folder. Lazy."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise DatasetError(f"{self.path}: no such data-set folder")
        if not self.path.is_dir():
            raise DatasetError(f"{self.path}: not a folder")
        self._dirs = dict(_type_dirs(self.path))
        if not self._dirs:
            raise DatasetError(
                f"{self.path}: no TypeN folders (expected a data-set root or a TypeN folder)"
            )
        self._metadata: dict[int, dict[str, dict[str, Any]]] = {}

    @property
    def types(self) -> list[int]:
        return sorted(self._dirs)

    @property
    def root(self) -> Path:
        """The folder that holds the TypeN folders (where labels.csv and truth/ live)."""
        if list(self._dirs.values()) == [self.path]:
            return self.path.parent
        return self.path

    def type_dir(self, type_id: int) -> Path:
        try:
            return self._dirs[type_id]
        except KeyError:
            raise DatasetError(f"{self.path}: no Type{type_id} folder") from None

    def metadata(self, type_id: int) -> dict[str, dict[str, Any]]:
        """The type's metadata.pkl (cached; small)."""
        if type_id not in self._metadata:
            self._metadata[type_id] = load_metadata(self.type_dir(type_id) / "metadata.pkl")
        return self._metadata[type_id]

    def names(self, type_id: int) -> list[str]:
        """Video names of a type, sorted numerically."""
        return [name for name, _ in _video_files(self.type_dir(type_id))]

    def videos(
        self, types: Iterable[int] | None = None, names: Iterable[str] | None = None
    ) -> Iterator[Video]:
        """Videos sorted by (type, name); only metadata is read, never the frames."""
        wanted_types = self.types if types is None else sorted(set(types))
        wanted_names = None if names is None else set(names)
        for type_id in wanted_types:
            if type_id not in self._dirs:
                raise DatasetError(f"{self.path}: no Type{type_id} folder")
            for name, path in _video_files(self._dirs[type_id]):
                if wanted_names is not None and name not in wanted_names:
                    continue
                yield self._make_video(type_id, name, path)

    def video(self, type: int, name: str) -> Video:
        path = self.type_dir(type) / f"{name}.npz"
        if not path.is_file():
            raise DatasetError(f"{path}: Type{type} video {name} not found")
        return self._make_video(type, name, path)

    def _make_video(self, type_id: int, name: str, path: Path) -> Video:
        meta = self.metadata(type_id)
        if name not in meta:
            raise DatasetError(f"{path}: Type{type_id} video {name} has no entry in metadata.pkl")
        video = Video(type=type_id, name=name, path=path, metadata=meta[name])
        check_entry(video.metadata, video.where)  # every command refuses what no reader can use
        return video

    def __len__(self) -> int:
        return sum(len(self.names(t)) for t in self.types)

    def __repr__(self) -> str:
        return f"Dataset({str(self.path)!r}, types={self.types})"


# ---------------------------------------------------------------- labels


@dataclass(frozen=True)
class Label:
    """Ground-truth label of one simulated video (frames inclusive; None for normal videos)."""

    type: int
    video: str
    kind: str
    onset_frame: int | None
    end_frame: int | None
    magnitude: float | None
    ramp_frames: int = 0  # > 0: the magnitude grows linearly over this many frames from onset

    @property
    def anomalous(self) -> bool:
        return self.kind != "normal"


def _label(row: dict[str, Any]) -> Label:
    """One labels.csv row as a Label; ValueError (or TypeError, AttributeError) when bad."""
    label = Label(
        type=int(row["type"]),
        video=row["video"].strip(),
        kind=row["kind"].strip(),
        onset_frame=int(row["onset_frame"]) if row["onset_frame"].strip() else None,
        end_frame=int(row["end_frame"]) if row["end_frame"].strip() else None,
        magnitude=float(row["magnitude"]) if row["magnitude"].strip() else None,
        ramp_frames=int((row.get(RAMP_COLUMN) or "").strip() or 0),
    )
    if not 1 <= label.type <= N_TYPES:
        raise ValueError(f"type {label.type} is outside 1..{N_TYPES}")
    for name in ("onset_frame", "end_frame", "ramp_frames"):
        value = getattr(label, name)
        if value is not None and not 0 <= value <= MAX_FRAMES:
            raise ValueError(f"{name} {value} is outside 0..{MAX_FRAMES}")
    if label.magnitude is not None and not math.isfinite(label.magnitude):
        raise ValueError(f"magnitude {label.magnitude} is not finite")
    if len(label.video) > MAX_NAME_CHARS or len(label.kind) > MAX_NAME_CHARS:
        raise ValueError(f"video or kind longer than {MAX_NAME_CHARS} characters")
    return label


def read_labels(root: str | os.PathLike) -> dict[tuple[int, str], Label]:
    """``labels.csv`` at a data-set root as {(type, video): Label}; {} when there is none.

    DatasetError naming the file and line for anything malformed or out of range, and
    for a file over MAX_LABELS_BYTES."""
    root = Path(root)
    if _TYPE_DIR.fullmatch(root.name) and not (root / "labels.csv").exists():
        root = root.parent
    path = root / "labels.csv"
    if not path.is_file():
        return {}
    if path.stat().st_size > MAX_LABELS_BYTES:
        raise DatasetError(f"{path}: over the {MAX_LABELS_BYTES}-byte limit")
    out: dict[tuple[int, str], Label] = {}
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        try:
            missing = [c for c in LABEL_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DatasetError(f"{path}: missing column(s) {', '.join(missing)}")
            for row in reader:
                label = _label(row)
                out[(label.type, label.video)] = label
        except csv.Error as exc:  # an over-long field: met before the line is counted
            raise DatasetError(
                f"{path}: line {reader.line_num + 1}: bad label row ({str(exc):.200})"
            ) from None
        except (TypeError, ValueError, AttributeError) as exc:  # UnicodeDecodeError too
            raise DatasetError(
                f"{path}: line {reader.line_num}: bad label row ({str(exc):.200})"
            ) from None
    return out


def write_labels(root: str | os.PathLike, labels: Iterable[Label]) -> None:
    """Write ``labels.csv`` sorted by (type, video)."""
    path = Path(root) / "labels.csv"
    rows = sorted(
        labels, key=lambda lb: (lb.type, int(lb.video) if lb.video.isdigit() else 0, lb.video)
    )
    ramps = any(lb.ramp_frames > 0 for lb in rows)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(LABEL_COLUMNS + ((RAMP_COLUMN,) if ramps else ()))
        for lb in rows:
            writer.writerow(
                [
                    lb.type,
                    lb.video,
                    lb.kind,
                    "" if lb.onset_frame is None else lb.onset_frame,
                    "" if lb.end_frame is None else lb.end_frame,
                    "" if lb.magnitude is None else repr(float(lb.magnitude)),
                ]
                + ([lb.ramp_frames or ""] if ramps else [])
            )
    os.replace(tmp, path)


# ---------------------------------------------------------------- validation


def _metadata_problems(entry: dict[str, Any], type_id: int, where: str) -> list[str]:
    problems = entry_problems(entry, where)
    values = {key: v for key in METADATA_FIELDS if (v := _field(entry, key)[0]) is not None}
    extra = sorted(set(entry) - set(METADATA_FIELDS))
    if extra:
        problems.append(f"{where}: unknown metadata field(s) {', '.join(extra)}")
    if "Index" in values and values["Index"] != type_id:
        problems.append(
            f"{where}: metadata field Index = {values['Index']} but the folder is Type{type_id}"
        )
    size = values.get("SizeInFrames")
    prev_end = None
    for n in (1, 2):
        ki, ke = f"KeyfIniObstacle{n}", f"KeyfEndObstacle{n}"
        if ki not in values or ke not in values:
            continue
        ini, end = values[ki], values[ke]
        if ini == -1 and end == -1:
            continue
        if ini < 0 or end < 0:
            problems.append(
                f"{where}: metadata fields {ki}={ini}, {ke}={end}: only one is negative"
            )
            continue
        if ini > end:
            problems.append(f"{where}: metadata fields {ki}={ini} > {ke}={end} (out of order)")
        if size is not None and end >= size:
            problems.append(
                f"{where}: metadata field {ke}={end} is past the end (SizeInFrames={size})"
            )
        if prev_end is not None and ini <= prev_end:
            problems.append(
                f"{where}: metadata field {ki}={ini} starts before window 1 ends ({prev_end})"
            )
        prev_end = end
    return problems


def _video_problems(path: Path, entry: dict[str, Any], where: str) -> list[str]:
    try:
        want = expected_shape(entry, where)
    except DatasetError:
        want = None  # field problem already reported
    try:
        _check_image(read_image(path, where, want), where)
    except DatasetError as exc:
        return [str(exc)]
    return []


def validate(path: str | os.PathLike) -> list[str]:
    """Every problem of a data set (root or TypeN folder) as one line naming file, video and field.

    Returns [] when clean. Raises DatasetError only when ``path`` is not a data set at all.
    Videos are read one at a time.
    """
    ds = Dataset(path)
    problems: list[str] = []
    for type_id in ds.types:
        folder = ds.type_dir(type_id)
        meta_path = folder / "metadata.pkl"
        try:
            meta = load_metadata(meta_path)
        except DatasetError as exc:
            problems.append(str(exc))
            meta = None
        files = _video_files(folder)
        for child in sorted(folder.iterdir()):
            if child.suffix == ".npz" and not _VIDEO_FILE.fullmatch(child.name):
                shown = str(child) if child.name.isprintable() else repr(str(child))
                problems.append(f"{shown}: npz name is not digits (expected NNNN.npz)")
        names = {name for name, _ in files}
        if meta is not None:
            for name in sorted(set(meta) - names):
                problems.append(
                    f"{meta_path}: video {name}: metadata entry has no {name}.npz (extra entry)"
                )
        for name, vpath in files:
            where = f"{vpath} (Type{type_id} video {name})"
            if meta is None:
                continue
            if name not in meta:
                problems.append(f"{where}: no metadata entry for video {name} in {meta_path.name}")
                continue
            problems.extend(_metadata_problems(meta[name], type_id, where))
            problems.extend(_video_problems(vpath, meta[name], where))
    return problems
