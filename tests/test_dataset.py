"""lhtstream.io.dataset: the seed's own loading code, round trips, validation, safe metadata."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lhtstream.base.errors import LhtstreamError
from lhtstream.io.dataset import (
    METADATA_FIELDS,
    Dataset,
    DatasetError,
    Label,
    load_metadata,
    read_labels,
    save_metadata,
    validate,
    write_labels,
)


def test_seed_loading_snippet_works_on_generated_folder(tiny_dataset, monkeypatch):
    monkeypatch.chdir(tiny_dataset.parent)
    type_dir = f"{tiny_dataset.name}/Type3"
    # verbatim from the seed document, with the folder prefixed
    with open(f"{type_dir}/metadata.pkl", "rb") as f:
        metadata = pickle.load(f)
        nframes = metadata["0001"]["SizeInFrames"]
    array = np.load(f"{type_dir}/0001.npz")["image"]
    m = metadata["0001"]
    assert set(m) == set(METADATA_FIELDS)
    assert array.shape == (
        nframes,
        m["InfBordPx"] - m["SupBordPx"] + 1,
        m["RightBordPx"] - m["LeftBordPx"] + 1,
    )
    assert nframes == 300 and m["Index"] == 3
    assert 14 <= array.shape[1] <= 20 and 18 <= array.shape[2] <= 26
    assert 0 <= m["LeftBordPx"] and m["RightBordPx"] < 32 and 0 <= m["SupBordPx"]
    assert m["InfBordPx"] < 32
    assert array.dtype == np.uint16 and array.max() <= 1024


def test_dataset_lists_lazily_sorted_and_loads(small_dataset):
    ds = Dataset(small_dataset)
    assert ds.types == [1, 3, 20]
    videos = list(ds.videos())
    assert [(v.type, v.name) for v in videos] == sorted((v.type, v.name) for v in videos)
    assert len(videos) == 24 == len(ds)
    only = list(ds.videos(types=[20], names=["0002"]))
    assert [(v.type, v.name) for v in only] == [(20, "0002")]
    v = ds.video(20, "0002")
    img = v.load()
    assert img.dtype == np.uint16 and img.shape == v.shape == (1500, *img.shape[1:])
    # a single TypeN folder works too, and knows its root (for labels.csv)
    one = Dataset(small_dataset / "Type20")
    assert one.types == [20] and one.root == small_dataset
    assert np.array_equal(one.video(20, "0002").load(), img)
    with pytest.raises(DatasetError, match="0099"):
        ds.video(20, "0099")
    with pytest.raises(DatasetError, match="Type9"):
        ds.video(9, "0001")


def test_round_trip_matches_simulator_output(tmp_path):
    from lhtstream.io.simulate import simulate_video, synthesize
    from lhtstream.io.simulate.writer import video_seed

    synthesize(tmp_path, types=[5], videos_per_type=2, frames=200, seed=11)
    sim = simulate_video(5, video_seed(11, 5, 2), 200)
    v = Dataset(tmp_path).video(5, "0002")
    assert np.array_equal(v.load(), sim.image)
    assert v.metadata == sim.metadata
    truth = np.load(tmp_path / "truth" / "Type5" / "0002.npz")
    assert np.array_equal(truth["x"], sim.truth["x"]) and truth["x"].dtype == np.float64
    # truth never leaks into the video file
    assert list(np.load(tmp_path / "Type5" / "0002.npz").files) == ["image"]


def test_obstacle_states_inclusive_windows():
    from lhtstream.io.dataset import Video

    meta = dict.fromkeys(METADATA_FIELDS, 0)
    meta.update(
        SizeInFrames=20,
        KeyfIniObstacle1=3,
        KeyfEndObstacle1=5,
        KeyfIniObstacle2=10,
        KeyfEndObstacle2=10,
        RightBordPx=17,
        InfBordPx=15,
    )
    states = Video(1, "0001", Path("x.npz"), meta).obstacle_states()
    assert states.dtype == np.int8 and states.shape == (20,)
    assert states.tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 2] + [0] * 9
    meta.update(KeyfIniObstacle1=-1, KeyfEndObstacle1=-1, KeyfIniObstacle2=-1, KeyfEndObstacle2=-1)
    assert not Video(1, "0001", Path("x.npz"), meta).obstacle_states().any()


def test_metadata_round_trip_and_numpy_scalars(tmp_path):
    meta = {"0001": {k: i for i, k in enumerate(METADATA_FIELDS)}}
    save_metadata(tmp_path / "m.pkl", meta)
    assert load_metadata(tmp_path / "m.pkl") == meta
    # real files may hold numpy scalars: admitted and returned as Python numbers
    np_meta = {"0001": {"Index": np.int64(3), "SizeInFrames": np.int32(7), "f": np.float64(2.0)}}
    (tmp_path / "n.pkl").write_bytes(pickle.dumps(np_meta, protocol=2))
    loaded = load_metadata(tmp_path / "n.pkl")
    assert loaded == {"0001": {"Index": 3, "SizeInFrames": 7, "f": 2.0}}
    assert type(loaded["0001"]["Index"]) is int


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize(
    "payload",
    [
        "evil_reduce",
        "ndarray",
        "object_scalar",
        "class_instance",
    ],
)
def test_restricted_unpickler_refuses_and_runs_nothing(tmp_path, payload):
    marker = tmp_path / "marker"
    if payload == "evil_reduce":
        obj = {"0001": {"Index": _Evil(marker)}}
    elif payload == "ndarray":
        obj = {"0001": {"Index": np.arange(3)}}
    elif payload == "object_scalar":
        obj = {"0001": {"Index": np.array([None], dtype=object)[0:1]}}
    else:
        obj = {"0001": Label(1, "0001", "normal", None, None, None)}
    path = tmp_path / "metadata.pkl"
    path.write_bytes(pickle.dumps(obj))
    with pytest.raises(DatasetError, match="metadata.pkl") as err:
        load_metadata(path)
    assert isinstance(err.value, LhtstreamError)
    assert not marker.exists()
    assert any(str(path) in p and "unsafe" in p for p in _validate_with_metadata(tmp_path, path))
    assert not marker.exists()


def _validate_with_metadata(tmp_path: Path, meta_path: Path) -> list[str]:
    folder = tmp_path / "Type1"
    folder.mkdir(exist_ok=True)
    shutil.copy(meta_path, folder / "metadata.pkl")
    return [p.replace(str(folder / "metadata.pkl"), str(meta_path)) for p in validate(folder)]


def test_non_numeric_numpy_dtype_in_pickle_refused(tmp_path):
    # hand-made pickle: numpy scalar whose dtype is object ('O8')
    from numpy._core.multiarray import scalar  # noqa: F401  (the global numpy pickles use)

    good = pickle.dumps(np.int64(5), protocol=2)
    bad = good.replace(b"i8", b"O8")
    assert bad != good
    path = tmp_path / "metadata.pkl"
    path.write_bytes(bad)
    with pytest.raises(DatasetError):
        load_metadata(path)


def test_metadata_size_bound_and_garbage(tmp_path, monkeypatch):
    import lhtstream.io.dataset as dsmod

    path = tmp_path / "metadata.pkl"
    save_metadata(path, {"0001": {"Index": 1}})
    monkeypatch.setattr(dsmod, "MAX_METADATA_BYTES", 10)
    with pytest.raises(DatasetError, match="limit"):
        load_metadata(path)
    monkeypatch.undo()
    path.write_bytes(b"\x80\x04garbage")
    with pytest.raises(DatasetError, match="metadata.pkl"):
        load_metadata(path)
    path.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(DatasetError, match="expected a dict"):
        load_metadata(path)
    with pytest.raises(DatasetError, match="missing"):
        load_metadata(tmp_path / "nope.pkl")


# ---------------------------------------------------------------- validation


@pytest.fixture
def broken(tiny_dataset, tmp_path):
    """A writable copy of the tiny data set: (type folder, metadata dict)."""
    root = tmp_path / "data"
    shutil.copytree(tiny_dataset, root)
    folder = root / "Type3"
    return folder, load_metadata(folder / "metadata.pkl")


def _save_image(path: Path, arr: np.ndarray, key: str = "image") -> None:
    np.savez(path, **{key: arr})


def _one(problems: list[str], *needles: str) -> str:
    hits = [p for p in problems if all(n in p for n in needles)]
    assert hits, f"no problem mentions {needles}: {problems}"
    return hits[0]


def test_validate_clean_set(tiny_dataset):
    assert validate(tiny_dataset) == []
    assert validate(tiny_dataset / "Type3") == []


def test_validate_metadata_entry_missing_and_extra(broken):
    folder, meta = broken
    del meta["0002"]
    meta["0007"] = dict(meta["0001"])
    save_metadata(folder / "metadata.pkl", meta)
    problems = validate(folder)
    _one(problems, "0002.npz", "no metadata entry")
    _one(problems, "0007", "extra")
    assert len(problems) == 2


def test_validate_npz_without_image(broken):
    folder, _ = broken
    _save_image(folder / "0001.npz", np.zeros((300, 3, 3), np.uint16), key="frames")
    _one(validate(folder), "0001.npz", "no 'image'")


def test_validate_shape_mismatch(broken):
    folder, meta = broken
    meta["0001"]["SizeInFrames"] = 299
    meta["0002"]["RightBordPx"] -= 1
    save_metadata(folder / "metadata.pkl", meta)
    problems = validate(folder)
    _one(problems, "video 0001", "shape", "299")
    _one(problems, "video 0002", "shape")


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda s: np.ones(s, bool), "dtype bool"),
        (lambda s: np.ones(s, np.complex64), "dtype complex64"),
        (lambda s: np.full(s, 2000, np.int32), "outside 0..1024"),
        (lambda s: np.full(s, -1, np.int16), "outside 0..1024"),
        (lambda s: np.full(s, 0.5), "non-integer"),
    ],
)
def test_validate_bad_values_and_dtypes(broken, make, needle):
    folder, meta = broken
    shape = np.load(folder / "0001.npz")["image"].shape
    _save_image(folder / "0001.npz", make(shape))
    problems = validate(folder)
    _one(problems, "0001.npz", needle)
    assert not any("0002" in p for p in problems)
    with pytest.raises(DatasetError, match=needle.split()[0]):
        Dataset(folder).video(3, "0001").load()


def test_load_converts_integral_other_dtypes(broken):
    folder, _ = broken
    original = Dataset(folder).video(3, "0001").load()
    for dtype in (np.int32, np.float64, np.uint8):
        _save_image(folder / "0001.npz", np.minimum(original, 255).astype(dtype))
        got = Dataset(folder).video(3, "0001").load()
        assert got.dtype == np.uint16 and np.array_equal(got, np.minimum(original, 255))
    assert validate(folder) == []


@pytest.mark.parametrize("damage", ["garbage", "truncated", "pickled_object"])
def test_validate_corrupt_npz(broken, damage):
    folder, _ = broken
    path = folder / "0002.npz"
    if damage == "garbage":
        path.write_bytes(b"this is not a zip file")
    elif damage == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        np.savez(path, image=np.array([{"a": 1}], dtype=object))
    problems = validate(folder)
    _one(problems, "0002.npz", "video 0002")
    with pytest.raises(DatasetError, match="0002"):
        Dataset(folder).video(3, "0002").load()


def test_validate_unreadable_metadata(broken):
    folder, _ = broken
    (folder / "metadata.pkl").write_bytes(b"\x00\x01\x02")
    _one(validate(folder), "metadata.pkl", "unreadable")
    (folder / "metadata.pkl").unlink()
    _one(validate(folder), "metadata.pkl", "missing")


@pytest.mark.parametrize(
    "changes, needles",
    [
        ({"KeyfIniObstacle1": 100, "KeyfEndObstacle1": 50}, ("KeyfIniObstacle1", "out of order")),
        ({"KeyfEndObstacle2": 300}, ("KeyfEndObstacle2", "past the end")),
        ({"KeyfIniObstacle2": 10, "KeyfEndObstacle2": 20}, ("KeyfIniObstacle2", "window 1")),
        ({"KeyfIniObstacle1": -1}, ("KeyfIniObstacle1", "negative")),
        ({"Index": 4}, ("Index", "Type3")),
        ({"Index": "3"}, ("Index", "not an integer")),
        ({"LeftBordPx": -2, "RightBordPx": 19}, ("LeftBordPx", "0 <=")),
        ({"SupBordPx": None}, ("SupBordPx", "not an integer")),
    ],
)
def test_validate_metadata_fields(broken, changes, needles):
    folder, meta = broken
    meta["0002"].update(changes)
    save_metadata(folder / "metadata.pkl", meta)
    problems = validate(folder)
    _one(problems, "video 0002", *needles)
    assert not any("video 0001" in p for p in problems)


def test_validate_missing_field(broken):
    folder, meta = broken
    del meta["0001"]["InfBordPx"]
    save_metadata(folder / "metadata.pkl", meta)
    _one(validate(folder), "video 0001", "InfBordPx", "missing")


def test_validate_unusable_path_raises(tmp_path):
    with pytest.raises(DatasetError, match="no such"):
        validate(tmp_path / "absent")
    with pytest.raises(DatasetError, match="no TypeN"):
        validate(tmp_path)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lhtstream.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_validate_cli_exit_codes(broken, tmp_path):
    folder, meta = broken
    ok = _cli("validate", str(folder))
    assert ok.returncode == 0 and "OK" in ok.stdout
    meta["0001"]["SizeInFrames"] = 5
    save_metadata(folder / "metadata.pkl", meta)
    (folder / "0002.npz").write_bytes(b"junk")
    bad = _cli("validate", str(folder))
    assert bad.returncode == 1
    assert "0001" in bad.stdout and "0002.npz" in bad.stdout and "Traceback" not in bad.stderr
    assert f"{len(bad.stdout.splitlines())} problem(s)" in bad.stderr
    gone = _cli("validate", str(tmp_path / "absent"))
    assert gone.returncode == 2 and "Traceback" not in gone.stderr
    assert gone.stderr.startswith("lhtstream: error:")


def test_labels_round_trip(tmp_path):
    labels = [
        Label(2, "0010", "power_drop", 300, 700, -0.35),
        Label(1, "0002", "normal", None, None, None),
        Label(1, "0001", "position_noise", 400, 499, 0.1414),
    ]
    write_labels(tmp_path, labels)
    text = (tmp_path / "labels.csv").read_text().splitlines()
    assert text[0] == "type,video,kind,onset_frame,end_frame,magnitude"
    assert text[1] == "1,0001,position_noise,400,499,0.1414"
    assert text[2] == "1,0002,normal,,,"
    got = read_labels(tmp_path)
    assert got == {(lb.type, lb.video): lb for lb in labels}
    assert not got[(1, "0002")].anomalous and got[(2, "0010")].anomalous
    assert read_labels(tmp_path / "elsewhere") == {}
    (tmp_path / "labels.csv").write_text(
        "type,video,kind,onset_frame,end_frame,magnitude\nx,1,n,,,\n"
    )
    with pytest.raises(DatasetError, match="line 2"):
        read_labels(tmp_path)
