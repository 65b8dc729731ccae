"""Hostile data-set files: every command refuses them with one line, in bounded memory and time.

Each file is built here from code (no binary data is committed): pickle "DAG bombs" of
shared references, opcode floods, npz zip bombs, .npy headers declaring gigabytes,
zero-frame videos, NaN / 1e30 / huge metadata values and TypeN folders outside 1..36.
The CLI runs in a child process whose address space is capped (RLIMIT_AS), so a reader
that allocates before it checks fails the test instead of swapping the machine.
"""

from __future__ import annotations

import os
import pickle
import resource
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from lhtstream.io.dataset import (
    DatasetError,
    load_metadata,
    read_image,
    read_labels,
    save_metadata,
)
from tests.processes import REPO_ROOT, ipc_endpoint

ADDRESS_SPACE = 1536 << 20  # the child's RLIMIT_AS (a refusing CLI peaks at ~110 MB resident)
SECONDS = 60  # every refusal below takes well under a second on a quiet machine


def _cap_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def run_capped(*args: object, timeout: float = SECONDS) -> subprocess.CompletedProcess:
    """``python -m lhtstream.cli ARGS`` with its address space capped; output captured."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(
        [sys.executable, "-m", "lhtstream.cli", *map(str, args)], env=env,
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
        preexec_fn=_cap_memory,
    )


def assert_refused(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2 and exactly one stderr line ``lhtstream: error: ...`` holding every needle."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr and "MemoryError" not in result.stderr
    errors = [line for line in lines if line.startswith("lhtstream: error:")]
    assert len(errors) == 1, lines
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def assert_reported(result: subprocess.CompletedProcess, *needles: str) -> str:
    """``validate`` found problems: exit 1, one problem per stdout line, one holds every needle."""
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    hits = [line for line in result.stdout.splitlines() if all(n in line for n in needles)]
    assert hits, (needles, result.stdout[-2000:])
    return hits[0]


@pytest.fixture(scope="module")
def model(tiny_dataset, tmp_path_factory) -> Path:
    """A calibrated Type3 model, so `evaluate` gets as far as reading the videos."""
    from lhtstream.service.training import fit_dataset

    return fit_dataset(tiny_dataset, workers=1).save(tmp_path_factory.mktemp("model") / "m.npz")


@pytest.fixture
def hostile(tiny_dataset, tmp_path) -> Path:
    """A writable copy of the tiny data set (Type3 videos 0001, 0002, labels.csv)."""
    root = tmp_path / "data"
    shutil.copytree(tiny_dataset, root)
    return root


def every_command(root: Path, model: Path, tmp_path: Path) -> dict:
    """validate, train, replay and evaluate on ``root``; each result with its ``seconds``."""
    commands = {
        "validate": ["validate", root],
        "train": ["train", root, "-o", tmp_path / "out.npz", "--workers", "1"],
        "replay": ["replay", root, "--rate", "max", "--wait-subscribers", "0",
                   "--endpoint", ipc_endpoint(tmp_path, "hostile")],
        "evaluate": ["evaluate", root, "--model", model, "--workers", "1", "--no-baseline"],
    }
    results = {}
    for name, args in commands.items():
        start = time.monotonic()
        results[name] = run_capped(*args)
        results[name].seconds = time.monotonic() - start  # type: ignore[attr-defined]
    return results


# ---------------------------------------------------------------- metadata.pkl


def _dag(depth: int) -> list:
    """A list whose two items are the same list, ``depth`` deep: 2**depth leaves when walked."""
    node: list = []
    for _ in range(depth):
        node = [node, node]
    return node


def _tuple_key_bomb(depth: int = 60) -> bytes:
    """{t: 1} where t = (t', t') nested ``depth`` deep, in raw opcodes: hashing t walks 2**depth
    tuples (Python cannot even build this dict to pickle it)."""
    ops = [pickle.PROTO + b"\x02", pickle.EMPTY_DICT, pickle.EMPTY_TUPLE, pickle.BINPUT + b"\x00"]
    for i in range(depth):
        ref = pickle.BINGET + bytes([i])
        ops += [ref, ref, pickle.TUPLE2, pickle.BINPUT + bytes([i + 1])]
    ops += [pickle.BININT1 + b"\x01", pickle.SETITEM, pickle.STOP]
    return b"".join(ops)


def _entry(**changes: object) -> dict:
    return {"Index": 3, "KeyfIniObstacle1": -1, "KeyfEndObstacle1": -1,
            "KeyfIniObstacle2": -1, "KeyfEndObstacle2": -1, "LeftBordPx": 0,
            "RightBordPx": 17, "SupBordPx": 0, "InfBordPx": 15, "SizeInFrames": 300, **changes}


PICKLE_BOMBS = {
    # the red team's kind: 462 bytes whose walk (repr, msgpack, copy) never ends
    "dag_field": lambda: pickle.dumps({"0001": _entry(Index=_dag(64))}),
    "dag_entry": lambda: pickle.dumps({"0001": _dag(64)}),
    "dag_top": lambda: pickle.dumps(_dag(64)),
    "cycle": lambda: pickle.dumps({"0001": _entry(Index=(lambda a: a.append(a) or a)([]))}),
    "tuple_key": _tuple_key_bomb,
    # 5 bytes that make the C unpickler size its memo table for 2**31 entries
    "memo_index": lambda: pickle.PROTO + b"\x02" + pickle.NONE
    + pickle.LONG_BINPUT + b"\xff\xff\xff\x7f" + pickle.STOP,
    # 3 MB of one-byte "new empty list": ~200 MB of lists if every opcode ran
    "opcode_flood": lambda: pickle.PROTO + b"\x02" + pickle.EMPTY_LIST * 3_000_000 + pickle.STOP,
    # 5000 videos sharing one 64-field entry: 320,000 fields from a 55 KB file
    "shared_entry": lambda: pickle.dumps(
        {f"{i:05d}": e for e in [{f"f{j}": j for j in range(64)}] for i in range(5000)}),
    "set": lambda: pickle.dumps({"0001": _entry(Index=frozenset({1}))}),
    "huge_string": lambda: pickle.dumps({"0001": _entry(Index="x" * 10_000_000)}),
    "huge_int_key": lambda: pickle.dumps({"0001": {10**5000: 1}}),
    "two_line_name": lambda: pickle.dumps({"0001\nfake: OK": _entry()}),
}


# Those a regressed reader would hang on, or allocate tens of GB for, run only in a capped child.
CHILD_ONLY = {"tuple_key", "memo_index"}


@pytest.mark.parametrize("bomb", sorted(set(PICKLE_BOMBS) - CHILD_ONLY))
def test_pickle_bombs_are_refused_at_once(tmp_path, bomb):
    path = tmp_path / "metadata.pkl"
    path.write_bytes(PICKLE_BOMBS[bomb]())
    start = time.monotonic()
    with pytest.raises(DatasetError, match="metadata.pkl") as err:
        load_metadata(path)
    assert time.monotonic() - start < 5
    assert len(str(err.value)) < 400 and "\n" not in str(err.value)


@pytest.mark.parametrize("bomb", ["dag_field", "tuple_key", "memo_index", "opcode_flood"])
def test_validate_cli_reports_pickle_bombs_in_bounded_memory(hostile, bomb):
    path = hostile / "Type3" / "metadata.pkl"
    path.write_bytes(PICKLE_BOMBS[bomb]())
    assert_reported(run_capped("validate", hostile), str(path))


def test_dag_bomb_is_refused_by_every_command(hostile, model, tmp_path):
    path = hostile / "Type3" / "metadata.pkl"
    path.write_bytes(PICKLE_BOMBS["dag_field"]())
    assert len(path.read_bytes()) < 600
    results = every_command(hostile, model, tmp_path)
    assert_reported(results.pop("validate"), str(path), "Index", "not a number")
    for name, result in results.items():
        assert_refused(result, str(path), "Index")
        assert result.seconds < SECONDS / 2, name


def test_metadata_is_returned_as_fresh_flat_dicts(tmp_path):
    # a legitimate file may share one entry between two videos: each gets its own copy
    shared = _entry()
    path = tmp_path / "metadata.pkl"
    path.write_bytes(pickle.dumps({"0001": shared, "0002": shared}))
    meta = load_metadata(path)
    assert meta["0001"] == meta["0002"] == shared
    assert meta["0001"] is not meta["0002"]
    meta["0001"]["Index"] = 9
    assert meta["0002"]["Index"] == 3


def test_metadata_bounds_leave_the_real_sizes_room(tmp_path):
    # the whole real data set in one file: 4223 videos x 10 numpy-scalar fields
    meta = {f"{i:04d}": {k: np.int64(v) for k, v in _entry().items()} for i in range(4223)}
    path = tmp_path / "metadata.pkl"
    path.write_bytes(pickle.dumps(meta, protocol=2))
    start = time.monotonic()
    loaded = load_metadata(path)
    assert len(loaded) == 4223 and loaded["4222"] == _entry()
    assert time.monotonic() - start < 10
    save_metadata(path, {"0001": _entry()})
    assert load_metadata(path) == {"0001": _entry()}


# ---------------------------------------------------------------- metadata values


@pytest.mark.parametrize(
    "field, value, needle",
    [
        ("SizeInFrames", float("nan"), "nan is not an integer"),
        ("SizeInFrames", 1e30, "1e+30 is not 1 <= SizeInFrames <= "),
        ("LeftBordPx", float("inf"), "inf is not an integer"),
        ("KeyfEndObstacle1", 10**400, "integer of 1329 bits> is not -1 <= KeyfEndObstacle1"),
        ("Index", 37, "37 is not 1 <= Index <= 36"),
        ("SizeInFrames", 0, "0 is not 1 <= SizeInFrames"),  # a zero-frame video
    ],
    ids=["nan", "1e30", "inf", "10**400", "type37", "zero_frames"],
)
def test_bad_metadata_values_are_refused_by_every_command(hostile, model, tmp_path,
                                                          field, value, needle):
    folder = hostile / "Type3"
    meta = load_metadata(folder / "metadata.pkl")
    meta["0001"][field] = value
    save_metadata(folder / "metadata.pkl", meta)
    if field == "SizeInFrames" and value == 0:  # the video agrees: it has no frames
        rows_cols = np.load(folder / "0001.npz")["image"].shape[1:]
        np.savez(folder / "0001.npz", image=np.zeros((0, *rows_cols), np.uint16))
    results = every_command(hostile, model, tmp_path)
    assert_reported(results.pop("validate"), "video 0001", field, needle)
    for result in results.values():
        assert_refused(result, "0001.npz", "video 0001", field, needle)


# ---------------------------------------------------------------- npz


def _write_npz(path: Path, shape: tuple[int, ...], data_bytes: int | None = None,
               descr: str = "<u2") -> None:
    """An npz whose ``image.npy`` header declares ``shape`` and holds ``data_bytes`` zero bytes
    (default: as many as the header declares), deflated and streamed in 16 MB chunks."""
    from numpy.lib import format as npformat

    if data_bytes is None:
        data_bytes = int(np.prod(shape)) * np.dtype(descr).itemsize
    chunk = bytes(16 << 20)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open("image.npy", "w", force_zip64=True) as fh:
            npformat.write_array_header_1_0(
                fh, {"descr": descr, "fortran_order": False, "shape": shape})
            for start in range(0, data_bytes, len(chunk)):
                fh.write(chunk[: min(len(chunk), data_bytes - start)])


BOMB_FRAMES = 1_000_000  # x 32 x 32 uint16 = 1.9 GiB of zeros: the largest video metadata allows


@pytest.fixture(scope="module")
def zip_bomb(tmp_path_factory) -> Path:
    """~9 MB on disk, 1.9 GiB declared and really there once inflated."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.npz"
    _write_npz(path, (BOMB_FRAMES, 32, 32))
    assert path.stat().st_size < 16 << 20
    return path


def _set_video(folder: Path, bomb: Path | None = None, **meta_changes: object) -> None:
    if bomb is not None:
        shutil.copy(bomb, folder / "0001.npz")
    if meta_changes:
        meta = load_metadata(folder / "metadata.pkl")
        meta["0001"].update(meta_changes)
        save_metadata(folder / "metadata.pkl", meta)


FULL_SENSOR = dict(LeftBordPx=0, RightBordPx=31, SupBordPx=0, InfBordPx=31)


@pytest.mark.parametrize("metadata_agrees", [True, False])
def test_zip_bomb_is_refused_from_its_header_by_every_command(hostile, model, tmp_path,
                                                              zip_bomb, metadata_agrees):
    folder = hostile / "Type3"
    if metadata_agrees:  # the metadata promises the bomb's shape: the byte bound refuses it
        _set_video(folder, zip_bomb, SizeInFrames=BOMB_FRAMES, **FULL_SENSOR)
        needle = "over the 268435456-byte limit"
    else:  # the metadata's shape differs: refused before the size even matters
        _set_video(folder, zip_bomb)
        needle = "does not match metadata"
    results = every_command(hostile, model, tmp_path)
    assert_reported(results.pop("validate"), "0001.npz", "video 0001", needle)
    for name, result in results.items():
        assert_refused(result, "0001.npz", "video 0001", needle)
        assert result.seconds < SECONDS / 2, name


def test_header_declaring_8_gib_is_refused_before_allocation(hostile, model, tmp_path):
    folder = hostile / "Type3"
    _write_npz(folder / "0001.npz", (4 << 20, 32, 32), data_bytes=4096)  # 8 GiB declared
    _set_video(folder, SizeInFrames=4 << 20, **FULL_SENSOR)  # over MAX_FRAMES: metadata refused
    results = every_command(hostile, model, tmp_path)
    assert_reported(results["validate"], "0001.npz", "SizeInFrames")
    assert_reported(results.pop("validate"), "0001.npz", "over the 268435456-byte limit")
    for result in results.values():
        assert_refused(result, "0001.npz", "SizeInFrames = 4194304 is not")
    with pytest.raises(DatasetError, match="8589934592 bytes, over"):
        read_image(folder / "0001.npz")


@pytest.mark.parametrize(
    "shape, data_bytes, descr, needle",
    [
        ((300, 16, 18), 4096, "<u2", "member image.npy is"),  # truncated data
        ((300, 16, 18), None, "|O", "dtype object"),  # object array, never unpickled
        ((300, 16, 18), None, "|V8", "dtype |V8"),  # raw void records
        ((300 * 16 * 18,), None, "<u2", "1 dimensions"),
        ((300, 16, 18, 1), None, "<u2", "4 dimensions"),
        ((1 << 62, 1 << 62, 4), 0, "<f8", "over the 268435456-byte limit"),  # overflows int64
    ],
)
def test_npz_headers_are_checked_before_reading(tmp_path, shape, data_bytes, descr, needle):
    path = tmp_path / "0001.npz"
    _write_npz(path, shape, data_bytes=data_bytes if data_bytes is not None else 64, descr=descr)
    with pytest.raises(DatasetError, match=needle.replace("|", r"\|")) as err:
        read_image(path, "the video")
    assert str(err.value).startswith("the video: ")


def test_npz_with_a_huge_zip_directory_is_refused_before_zipfile_parses_it(tmp_path):
    path = tmp_path / "0001.npz"
    np.savez(path, image=np.zeros((3, 2, 2), np.uint16))
    with zipfile.ZipFile(path, "a") as zf:
        for i in range(3000):
            zf.writestr(f"pad{i}", b"")
    with pytest.raises(DatasetError, match="3001 members"):
        read_image(path)


def test_npz_whose_zip64_record_declares_a_huge_directory_is_refused(tmp_path):
    # zipfile takes the counts of a ZIP64 record that precedes the end record, whatever the
    # end record says: so must the check. (A real 16 GB directory is not needed to test it.)
    import struct

    path = tmp_path / "0001.npz"
    np.savez(path, image=np.zeros((3, 2, 2), np.uint16))
    data = path.read_bytes()
    at = data.rfind(b"PK\x05\x06")
    record = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0,
                         10**7, 10**7, 16 << 30, 0)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, at, 1)
    path.write_bytes(data[:at] + record + locator + data[at:])
    with pytest.raises(DatasetError, match="10000000 members"):
        read_image(path)


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_npz_compressed_other_than_numpy_does_is_refused_before_inflating(tmp_path, method):
    # zipfile inflates a whole bzip2/lzma chunk at once: a few KB could be GBs (not built here)
    path = tmp_path / "0001.npz"
    with zipfile.ZipFile(path, "w", method) as zf, zf.open("image.npy", "w") as fh:
        np.save(fh, np.zeros((3, 2, 2), np.uint16))
    with pytest.raises(DatasetError, match=f"compression method {method};"):
        read_image(path)


def test_encrypted_npz_is_a_one_line_error(tmp_path):
    path = tmp_path / "0001.npz"
    np.savez(path, image=np.zeros((3, 2, 2), np.uint16))
    data = bytearray(path.read_bytes())
    for sig in (b"PK\x03\x04", b"PK\x01\x02"):  # set the "encrypted" flag bit in both headers
        at = data.find(sig)
        data[at + (6 if sig == b"PK\x03\x04" else 8)] |= 1
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="corrupt or truncated npz.*encrypted"):
        read_image(path)


def test_npz_of_other_shapes_and_dtypes_still_read(tmp_path):
    # what np.load reads, read_image reads: uncompressed and compressed, any numeric dtype
    image = np.arange(2 * 3 * 4, dtype=np.int32).reshape(2, 3, 4)
    np.savez(tmp_path / "a.npz", image=image)
    np.savez_compressed(tmp_path / "b.npz", image=np.asfortranarray(image.astype(np.float32)))
    assert np.array_equal(read_image(tmp_path / "a.npz"), image)
    got = read_image(tmp_path / "b.npz", shape=(2, 3, 4))
    assert got.dtype == np.float32 and np.array_equal(got, image)
    with pytest.raises(DatasetError, match=r"\(2, 3, 4\) does not match metadata"):
        read_image(tmp_path / "a.npz", shape=(2, 3, 5))


# ---------------------------------------------------------------- type folders


@pytest.mark.parametrize("name", ["Type0", "Type37", "Type03", "Type99999999999999999999"])
def test_type_folders_outside_1_to_36_are_refused_by_every_command(hostile, model, tmp_path,
                                                                   name):
    shutil.copytree(hostile / "Type3", hostile / name)
    for result in every_command(hostile, model, tmp_path).values():
        assert_refused(result, str(hostile / name), "types are Type1..Type36")
    # named directly, as a single TypeN folder, too
    assert_refused(run_capped("validate", hostile / name), str(hostile / name))


def test_folders_that_are_not_type_folders_are_still_ignored(hostile):
    (hostile / "Type3_backup").mkdir()
    (hostile / "Type40").write_text("a file, not a folder")
    assert run_capped("validate", hostile).returncode == 0


# ---------------------------------------------------------------- other files


@pytest.mark.parametrize("kind", ["dev_zero", "fifo", "folder"])
def test_metadata_that_is_not_a_regular_file_is_refused_without_reading(hostile, kind):
    path = hostile / "Type3" / "metadata.pkl"
    path.unlink()
    if kind == "dev_zero":
        path.symlink_to("/dev/zero")  # read to the end, it never ends
    elif kind == "fifo":
        os.mkfifo(path)  # opened, it blocks until a writer comes
    else:
        path.mkdir()
    result = run_capped("validate", hostile, timeout=SECONDS)
    assert_reported(result, str(path), "not a regular file")


@pytest.mark.parametrize(
    "row, needle",
    [
        ("3,0001,normal,,,\x00", "bad label row"),
        ("3,0001,normal,,," + "x" * 200_000, "field larger than field limit"),
        ("99,0001,normal,,,", "type 99 is outside 1..36"),
        ("3,0001,power_drop,10,20,nan", "magnitude nan is not finite"),
        ("3,0001,power_drop,10,1" + "0" * 40 + ",0.5", "end_frame"),
        ("3,0001,power_drop,10,20", "bad label row"),  # a column short
    ],
    ids=["nul", "long_field", "type99", "nan", "huge_frame", "short_row"],
)
def test_bad_labels_are_one_line_errors(hostile, tmp_path, row, needle):
    path = hostile / "labels.csv"
    path.write_text("type,video,kind,onset_frame,end_frame,magnitude\n" + row + "\n")
    with pytest.raises(DatasetError, match=needle) as err:
        read_labels(hostile)
    assert str(err.value).startswith(f"{path}: line 2: ")
    assert_refused(run_capped("train", hostile, "-o", tmp_path / "m.npz", "--workers", "1"),
                   str(path), "line 2", needle)


def test_labels_that_are_not_utf8_are_one_line_errors(hostile):
    path = hostile / "labels.csv"
    path.write_bytes(b"type,video,kind,onset_frame,end_frame,magnitude\n3,\xff\xfe,normal,,,\n")
    with pytest.raises(DatasetError, match="labels.csv: line .*codec"):
        read_labels(hostile)


def test_file_names_with_newlines_cannot_split_a_problem_line(hostile):
    folder = hostile / "Type3"
    shutil.copy(folder / "0001.npz", folder / "0003.npz\n0004.npz")
    (folder / "x\ny.npz").write_bytes(b"")
    (hostile / "Type3\n").mkdir()  # not a type folder: ignored
    result = run_capped("validate", hostile)
    assert_reported(result, "npz name is not digits", r"x\ny.npz")
    assert_reported(result, "npz name is not digits", r"0003.npz\n0004.npz")
    assert result.stdout.count("\n") == 2, result.stdout
