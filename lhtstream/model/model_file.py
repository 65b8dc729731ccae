"""The normality model's file: one `.npz` of named arrays plus a JSON header, read with bounds.

The arrays are the model table's fields by name (`CELL` and `OBSTACLE_STATE` of
`lhtstream.kernels.scoring`, so a field added there is saved and loaded with no
change here) plus the thresholds; the header (key ``header``, UTF-8 JSON) is a map:
format and version, `TABLE_LAYOUT`, score groups, phase bins, feature settings,
training and calibration summaries, and the arrays' SHA-256.

The SHA-256 is an integrity check against damage and accidental edits, not a
signature: whoever can write the file can recompute it. What protects the monitor
from a bad model is `read`, which refuses, before anything is allocated from the
file's word, a header that is not a bounded map and arrays of another shape or
dtype, and then every value the kernels could not score with (NaN, non-positive
variances, covariances that are not positive definite, disordered thresholds).
Every refusal is a `ModelError` naming the file and the field.
"""

from __future__ import annotations

import hashlib
import json
import math
import zipfile
from pathlib import Path
from typing import IO, Any

import numpy as np

from lhtstream.base.errors import LhtstreamError
from lhtstream.io.dataset import zip_directory_size
from lhtstream.kernels.layout import digest_of
from lhtstream.kernels.scoring import (
    CELL,
    CHOL,
    GROUPS,
    N_GROUPS,
    N_IMAGE,
    N_OBSTACLE,
    OBSTACLE_STATE,
)

FORMAT = "lhtstream-model"
FORMAT_VERSION = 3  # 3: image quantities, change groups (`chol`), image kind; 2: cycle comb
#: Digest of the declared layouts the model's arrays are cut from (`CELL`, `OBSTACLE_STATE`):
#: a file made for another layout is refused by name, never misread.
TABLE_LAYOUT = digest_of(CELL, OBSTACLE_STATE)

PLAIN_ARRAYS = ("count", "raise_thr", "clear_thr", "video_thr")  # not views of the table
#: every array of the file, in the order the checksum covers them
ARRAYS = ("types", *CELL.names, *OBSTACLE_STATE.names, *PLAIN_ARRAYS)
FILE_DTYPES = {"types": np.int64, "valid": np.uint8, "known": np.uint8}  # others float64

MAX_HEADER_BYTES = 1 << 20
MAX_MEMBERS = 64  # zip members of a model file (it has one per array and the header)
MAX_DIRECTORY_BYTES = 64 * 1024  # its zip central directory (a model's is ~2 KB)
MAX_TYPES = 64
MAX_PHASE_BINS = 500  # 10x the default; bounds the table at ~65 MB with MAX_TYPES
MAX_TYPE_ID = 1 << 31


class ModelError(LhtstreamError):
    """A model file that cannot be used: wrong format, version, layout, values or tampered."""


def digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over `ARRAYS` (name, dtype, shape, bytes): an integrity check, not a signature."""
    h = hashlib.sha256()
    for name in ARRAYS:
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def expected_shapes(types: int, bins: int) -> dict[str, tuple[int, ...]]:
    """Shape of every array of a model of `types` types and `bins` phase bins."""
    cell = (types, N_OBSTACLE, bins)
    shapes: dict[str, tuple[int, ...]] = {"types": (types,)}
    shapes.update({f.name: cell + f.shape for f in CELL})
    shapes.update({f.name: (types, N_OBSTACLE) + f.shape for f in OBSTACLE_STATE})
    shapes.update(count=cell, raise_thr=(types, N_GROUPS), clear_thr=(types, N_GROUPS),
                  video_thr=(types,))
    return shapes


def read(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The header and arrays of a model file, checked (see the module doc): `ModelError`
    if the file is not a usable model. Feature settings are the caller's to compare."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            entries, dir_bytes = zip_directory_size(fh) or (0, 0)
        if entries > MAX_MEMBERS or dir_bytes > MAX_DIRECTORY_BYTES:
            raise ModelError(f"{path}: not a model file ({entries} zip members in a "
                             f"{dir_bytes}-byte directory; a model has {len(ARRAYS) + 1})")
        zf = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise ModelError(f"{path}: no such model file") from None
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        raise ModelError(f"{path}: not a model file ({exc})") from None
    with zf:
        members = {info.filename: info for info in zf.infolist()}
        raw = _member(path, zf, members, "header", None, np.uint8, MAX_HEADER_BYTES)
        try:
            header = json.loads(raw.tobytes().decode())
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise ModelError(f"{path}: model header is not valid JSON") from None
        check_header(path, header)
        arrays = {"types": _member(path, zf, members, "types", None, np.int64, MAX_TYPES)}
        shapes = expected_shapes(len(arrays["types"]), header["phase_bins"])
        for name in ARRAYS[1:]:
            arrays[name] = _member(path, zf, members, name, shapes[name],
                                   FILE_DTYPES.get(name, np.float64))
    if digest(arrays) != header["sha256"]:
        raise ModelError(f"{path}: model arrays do not match the header checksum "
                         "(file modified or damaged)")
    check_values(path, arrays)
    return header, arrays


def _member(path: Path, zf: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo], name: str,
            shape: tuple[int, ...] | None, dtype: Any, max_len: int = 0) -> np.ndarray:
    """Array `name` of the npz, its shape and dtype checked from the npy header before the
    data are read (`shape` None: 1-D of 1..`max_len` elements)."""
    info = members.get(name + ".npy")
    if info is None:
        raise ModelError(f"{path}: not a model file (no {name!r} array)" if name == "header"
                         else f"{path}: model lacks array {name!r}")
    dtype = np.dtype(dtype)
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        # what numpy writes; zipfile inflates bzip2 and lzma chunks with no length bound
        raise ModelError(f"{path}: model field {name!r} uses zip compression method "
                         f"{info.compress_type}; numpy writes only 0 (stored) or 8 (deflated)")
    try:
        with zf.open(info) as fh:
            got_shape, got_dtype = _npy_header(fh)
            if shape is None:
                ok_shape = len(got_shape) == 1 and 1 <= got_shape[0] <= max_len
                want = f"1 to {max_len} values"
            else:
                ok_shape = got_shape == shape
                want = f"shape {shape}"
            if not ok_shape or got_dtype != dtype:
                raise ModelError(f"{path}: model field {name!r} has shape {got_shape} "
                                 f"{got_dtype}, expected {want} {dtype}")
        with zf.open(info) as fh:  # read_array reads the header again, then count values
            return np.lib.format.read_array(fh, allow_pickle=False)
    except ModelError:
        raise
    except Exception as exc:  # a damaged member: zlib, truncated data, bad npy header
        raise ModelError(f"{path}: model field {name!r} is unreadable "
                         f"({type(exc).__name__}: {exc})") from None


def _npy_header(fh: IO[bytes]) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
    else:
        raise ValueError(f"npy format version {version}")
    return tuple(shape), dtype


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _field(path: Path, name: str, problem: str) -> ModelError:
    return ModelError(f"{path}: model field {name!r} {problem}")


def check_header(path: Path, header: Any) -> None:
    """The header is a map with the fields and bounds this lhtstream reads."""
    if not isinstance(header, dict):
        raise ModelError(f"{path}: model header is a JSON {type(header).__name__}, "
                         "expected a map")
    if header.get("format") != FORMAT:
        raise ModelError(f"{path}: not an lhtstream model (format {_short(header.get('format'))})")
    if header.get("format_version") != FORMAT_VERSION:
        raise ModelError(
            f"{path}: model format version {_short(header.get('format_version'))}, this "
            f"lhtstream reads version {FORMAT_VERSION}; retrain with `lhtstream train`")
    if header.get("layout") != TABLE_LAYOUT:
        raise ModelError(
            f"{path}: model was made for table layout {_short(header.get('layout'))}, this "
            f"lhtstream uses {TABLE_LAYOUT!r}; retrain with `lhtstream train`")
    if header.get("groups") != list(GROUPS):
        raise _field(path, "groups", f"is {_short(header.get('groups'))}, this lhtstream "
                     f"scores {list(GROUPS)}")
    bins = header.get("phase_bins")
    if type(bins) is not int or not 1 <= bins <= MAX_PHASE_BINS:
        raise _field(path, "phase_bins", f"is {_short(bins)}, expected a whole number in "
                     f"1..{MAX_PHASE_BINS}")
    for name in ("features", "training", "calibration"):
        if not isinstance(header.get(name), dict):
            raise _field(path, name, f"is {_short(header.get(name))}, expected a map")
    if not isinstance(header.get("sha256"), str):
        raise _field(path, "sha256", "is missing")
    for name in ("not_judged", "unreachable"):
        value = header["calibration"].get(name, [])
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise _field(path, f"calibration.{name}", f"is {_short(value)}, expected a "
                         "list of group names")
    for name in ("videos", "frames", "between_video_dof"):
        value = header["training"].get(name, 0)
        if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
            raise _field(path, f"training.{name}", f"is {_short(value)}, expected a "
                         "number >= 0")


def check_values(path: Path, a: dict[str, np.ndarray]) -> None:
    """Every value the kernels read is one they can score with (see the module doc)."""
    types = a["types"]
    if np.any(types <= 0) or np.any(types >= MAX_TYPE_ID) or np.any(np.diff(types) <= 0):
        raise _field(path, "types", f"is {_short(types.tolist())}, expected increasing "
                     "positive type ids")
    for name in ("valid", "known"):
        if np.any(a[name] > 1):
            raise _field(path, name, "holds values other than 0 and 1")
    for name in (*(n for n in CELL.names if n != "valid"), "count"):
        if not np.isfinite(a[name]).all():
            raise _field(path, name, "holds values that are not finite")
    if np.any(a["count"] < 0):
        raise _field(path, "count", "holds negative counts")
    for name in ("cov4", "prec4", "prec2", "cprec"):
        _positive_definite(path, name, a[name])
    if not (a["svar"] > 0).all():
        raise _field(path, "svar", "holds variances that are not positive")
    chol = CHOL.view(a["chol"])
    diagonal = np.concatenate([chol.pos[..., [0, 2]], chol.logi[..., None],
                               chol.spread[..., None],
                               chol.image[..., [i * (i + 1) // 2 + i for i in range(N_IMAGE)]]],
                              axis=-1)
    if not (diagonal > 0).all():
        raise _field(path, "chol", "has Cholesky factors with a diagonal that is not positive "
                     "(its covariance is not positive definite)")
    for name in OBSTACLE_STATE.names:
        if name != "known" and not (np.isfinite(a[name][..., 0]).all()
                                    and (a[name][..., 1] > 0).all()
                                    and np.isfinite(a[name][..., 1]).all()):
            raise _field(path, name, "needs a finite mean and a positive finite variance")
    # thresholds: inf means "not judged" (see detector.calibrate); otherwise a positive raise
    # level above a clear level
    raise_thr, clear_thr = a["raise_thr"], a["clear_thr"]
    if not (raise_thr > 0).all():
        raise _field(path, "raise_thr", "holds thresholds that are NaN or not positive")
    if np.isnan(clear_thr).any() or np.isneginf(clear_thr).any():
        raise _field(path, "clear_thr", "holds thresholds that are NaN or -inf")
    finite = np.isfinite(raise_thr)
    if not (clear_thr[finite] < raise_thr[finite]).all():
        raise _field(path, "clear_thr", "holds thresholds not below their raise threshold")
    if not (a["video_thr"] > 0).all():
        raise _field(path, "video_thr", "holds thresholds that are NaN or not positive")


def _positive_definite(path: Path, name: str, m: np.ndarray) -> None:
    if not np.isfinite(m).all():
        raise _field(path, name, "holds values that are not finite")
    mt = np.swapaxes(m, -1, -2)
    scale = np.abs(m).max(axis=(-2, -1))
    if not (np.abs(m - mt).max(axis=(-2, -1)) <= 1e-6 * scale).all():
        raise _field(path, name, "holds matrices that are not symmetric")
    try:
        np.linalg.cholesky(0.5 * (m + mt))
    except np.linalg.LinAlgError:
        raise _field(path, name, "holds matrices that are not positive definite") from None
