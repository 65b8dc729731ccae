"""lhtstream.kernels.layout: declared state layouts, named views, the kernels' cache key."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lhtstream
from lhtstream.io.simulate import simulate_video
from lhtstream.kernels.features import video_features
from lhtstream.kernels.layout import Layout, digest_of
from lhtstream.kernels.step import STREAM
from lhtstream.model.detector import calibrate
from lhtstream.model.normality import NormalityModel
from lhtstream.service.pipeline import StreamPipeline


def test_offsets_follow_the_declaration_in_order():
    inner = Layout("inner", [("a", 1), ("b", 2)])
    lay = Layout("outer", [("x", 1), ("v", 3), ("m", (2, 2)), ("sub", inner),
                           ("rep", (3, inner)), ("y", 1)])
    assert [(f.name, f.offset, f.width) for f in lay] == [
        ("x", 0, 1), ("v", 1, 3), ("m", 4, 4), ("sub", 8, 3), ("rep", 11, 9), ("y", 20, 1)]
    assert lay.size == 21
    with pytest.raises(ValueError, match="twice"):
        Layout("bad", [("a", 1), ("a", 2)])
    with pytest.raises(ValueError, match="positive"):
        Layout("bad", [("a", 0)])


def test_digest_changes_with_any_field_and_with_nested_layouts():
    base = Layout("s", [("a", 1), ("b", 2)])
    assert Layout("s", [("a", 1), ("b", 2)]).digest == base.digest
    assert Layout("s", [("b", 2), ("a", 1)]).digest != base.digest  # reordered
    assert Layout("s", [("a", 1), ("b", 3)]).digest != base.digest  # resized
    assert Layout("s", [("a", 1), ("c", 2)]).digest != base.digest  # renamed
    n1 = Layout("n", [("p", 1), ("q", 1)])
    n2 = Layout("n", [("q", 1), ("p", 1)])  # same size, different meaning
    assert Layout("o", [("n", n1)]).digest != Layout("o", [("n", n2)]).digest
    assert digest_of(n1, base) != digest_of(n2, base)


def test_view_is_named_and_read_only_part_is_writable():
    inner = Layout("inner", [("a", 1), ("b", 2)])
    lay = Layout("outer", [("x", 1), ("m", (2, 2)), ("rep", (3, inner))])
    arr = np.arange(lay.size, dtype=np.float64)
    v = lay.view(arr)
    assert v.x == 0.0 and isinstance(v.x, float)
    assert v.m.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert v.rep.a.tolist() == [5.0, 8.0, 11.0]
    assert v.rep.b[2].tolist() == [12.0, 13.0]
    with pytest.raises(ValueError):
        v.m[0, 0] = 9.0
    with pytest.raises(AttributeError, match="no field 'nope'"):
        _ = v.nope
    lay.part(arr, "m")[1, 1] = -1.0
    lay.set(arr, x=7.0)
    assert arr[4] == -1.0 and arr[0] == 7.0
    # on a stack of arrays: every field gets the leading axes
    many = np.zeros((4, 5, lay.size))
    assert lay.part(many, "m").shape == (4, 5, 2, 2)
    assert lay.view(many).x.shape == (4, 5)
    with pytest.raises(ValueError, match="holds"):
        lay.view(np.zeros(lay.size + 1))


def test_python_reads_by_name_what_the_compiled_step_wrote():
    """The kernels address the stream state by the generated offsets, Python by name: both
    come from one declaration, so the frame count the scoring kernel keeps, the slot the
    pipeline set and the ring count agree with what the pipeline saw."""
    rows = [video_features(simulate_video(1, s, 1500).image) for s in range(3)]
    model = NormalityModel.fit([(1, r) for r in rows[:2]])
    calibrate(model, [(1, rows[2])], population=False)
    sim = simulate_video(1, 5, 300)
    pipe = StreamPipeline("ws1", model=model, ring_capacity=64)
    pipe.start_video("0001", 1)
    for i, frame in enumerate(sim.image):
        pipe.process(frame, {"video": "0001", "type": 1, "frame": i, "t_ns": 0})
    v = STREAM.view(pipe.state)
    assert v.score.frames == len(sim.image)
    assert v.ring_total == len(sim.image) == pipe.ring.total
    assert v.ring_capacity == 64
    assert v.slot == model.slot(1)
    assert v.det.frames == len(sim.image)
    assert np.array_equal(v.det.smooth, pipe.detector.smooth)


_PROBE = """
import json
import numpy as np
from lhtstream.kernels.features import new_track_state
from lhtstream.kernels.step import STREAM, lost_frames
state = np.zeros(STREAM.size)
STREAM.part(state, "track")[:] = new_track_state()
lost_frames(3, True, state)
stats = lost_frames.stats
print(json.dumps({"frames": STREAM.view(state).score.frames,
                  "hits": sum(stats.cache_hits.values()),
                  "misses": sum(stats.cache_misses.values())}))
"""


def _probe(root) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env["PYTHONPATH"] = str(root)
    proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=root, env=env, text=True,
                          capture_output=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_layout_change_in_another_file_makes_the_cached_kernel_stale(tmp_path):
    """`step.lost_frames` is cached from step.py, but compiles in scoring's state layout.
    Plain Numba keys its cache on step.py alone, so after a field is added to scoring's
    layout it would load the old kernel, which writes the frame count where `n` now is
    (and reads 1.0, the `prev` flag, as the count).
    Keyed on every kernel source, the cached kernel is refused and recompiled."""
    root = tmp_path / "tree"
    shutil.copytree(Path(lhtstream.__file__).parent, root / "lhtstream",
                    ignore=shutil.ignore_patterns("__pycache__"))
    first = _probe(root)
    assert first == {"frames": 3.0, "hits": 0, "misses": 1}
    assert _probe(root) == {"frames": 3.0, "hits": 1, "misses": 0}  # the cache works
    scoring = root / "lhtstream" / "kernels" / "scoring.py"
    text = scoring.read_text()
    declaration = 'SCORE = Layout("score_state", [\n'
    assert text.count(declaration) == 1
    scoring.write_text(text.replace(declaration, declaration + '    ("spare", 1),\n'))
    assert _probe(root) == {"frames": 3.0, "hits": 0, "misses": 1}
