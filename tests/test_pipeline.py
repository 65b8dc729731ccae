"""StreamPipeline on simulated videos: each fault raises its alarm kind, normal videos none."""

from __future__ import annotations

import numpy as np
import pytest

from lhtstream.io.dataset import obstacle_states
from lhtstream.io.simulate import ANOMALY_KINDS, Anomaly, simulate_video
from lhtstream.kernels import features as F
from lhtstream.kernels.features import video_features
from lhtstream.model.detector import ALARM_KIND_FOR_ANOMALY, ALARM_KINDS, Alarm, Verdict, calibrate
from lhtstream.model.normality import NormalityModel
from lhtstream.service.pipeline import NO_EVENTS, StreamPipeline

FRAMES = 3000
TYPE = 3  # has obstacle windows


def _rows(seed: int) -> np.ndarray:
    v = simulate_video(TYPE, seed, FRAMES)
    return video_features(v.image, obstacle_states(v.metadata))


@pytest.fixture(scope="module")
def model():
    # thresholds come from held-out footage with their confidence bounds: 6 held-out
    # videos (18 s) of one type are about the least that judges every group
    m = NormalityModel.fit([(TYPE, _rows(s)) for s in range(10)])
    calibrate(m, [(TYPE, _rows(100 + s)) for s in range(6)])
    return m


@pytest.fixture(scope="module")
def normal_verdicts(model) -> list:
    pipe = StreamPipeline("ws1", model)
    return [(seed, _run(pipe, simulate_video(TYPE, seed, FRAMES), f"{seed}"))
            for seed in (200, 201, 202)]


def _run(pipe: StreamPipeline, v, name: str) -> list:
    obs = obstacle_states(v.metadata)
    events = list(pipe.start_video(name, TYPE, v.metadata))
    for i, frame in enumerate(v.image):
        header = {"video": name, "type": TYPE, "frame": i, "seq": i, "t_ns": i * 1_000_000,
                  "obstacle": int(obs[i])}
        events.extend(pipe.process(frame, header))
    events.extend(pipe.end_video_events())
    return events


@pytest.mark.parametrize("kind", ANOMALY_KINDS)
def test_fault_raises_alarm_of_its_kind_after_onset(model, normal_verdicts, kind):
    v = simulate_video(TYPE, 900, FRAMES, kind)
    _, onset, end, _ = v.label
    events = _run(StreamPipeline("ws1", model), v, "0900")
    want = ALARM_KIND_FOR_ANOMALY[kind]
    raises = [e for e in events if isinstance(e, Alarm) and e.state == "raise"]
    hits = [a.frame for a in raises if a.kind == want and onset <= a.frame <= end + 100]
    assert hits, f"{kind}: no {want} alarm in {onset}..{end + 100}; got {raises}"
    assert not [a for a in raises if a.frame < onset], "alarm before the fault started"
    verdict = events[-1]
    assert isinstance(verdict, Verdict) and want in verdict.kinds
    # every fault, sensor included, scores above the normal videos of its type and past
    # the threshold (1.0): footage with camera faults does not verify a workpiece as good
    assert verdict.score > max(events[-1].score for _, events in normal_verdicts)
    assert verdict.score > 1.0 and verdict.anomalous
    if want == "sensor":
        # ... but the verdict says it was the camera, not the process
        assert verdict.kinds == ["sensor"]
    # every kind within two scan cycles (the cycle comb sees position noise, shrink,
    # misplaced patterns and frequency steps regardless of the video's geometry)
    assert min(hits) - onset <= 20, f"{kind}: first {want} alarm {min(hits) - onset} late"
    if kind == "scanner_stall":
        # a stalled spot's frames are faint, not blank: a process fault, not the camera
        assert "sensor" not in {a.kind for a in raises}
    if kind in ("frequency_drift", "pattern_shrink", "position_noise"):
        # the right kind is also the first one raised after the onset
        assert min((a.frame, a.kind) for a in raises if a.frame >= onset)[1] == want


def test_normal_videos_raise_nothing_and_verdict_is_normal(normal_verdicts):
    for _seed, events in normal_verdicts:
        assert [e for e in events if isinstance(e, Alarm)] == []
        assert len(events) == 1 and not events[0].anomalous and events[0].frames == FRAMES
        assert 0.0 <= events[0].score < 1.0  # below every threshold


def test_streaming_equals_batch_and_no_event_is_a_shared_tuple(model):
    v = simulate_video(TYPE, 300, 600)
    obs = obstacle_states(v.metadata)
    pipe = StreamPipeline("a", model, adapt=False)
    pipe.start_video("x", TYPE)
    outs = [pipe.process(f, {"video": "x", "type": TYPE, "frame": i, "obstacle": int(obs[i])})
            for i, f in enumerate(v.image)]
    assert all(o is NO_EVENTS for o in outs)
    streamed = pipe.end_video()
    # the offline paths: frames in one block, and measured rows (the KDE-AMD protocol's)
    blocks = StreamPipeline("b", model, adapt=False)
    ev = blocks.process_block(v.image, obs, {"video": "x", "type": TYPE})
    ev += blocks.end_video_events()
    assert streamed.score == ev[-1].score
    rows = StreamPipeline("c", model, adapt=False)
    ev = rows.process_measured(F.measure_video(v.image), obs, {"video": "x", "type": TYPE})
    ev += rows.end_video_events()
    assert streamed.score == ev[-1].score
    assert np.array_equal(rows.ring.latest(600), video_features(v.image, obs), equal_nan=True)


def test_learning_is_frozen_while_an_alarm_is_active(model):
    v = simulate_video(TYPE, 400, 800)
    obs = obstacle_states(v.metadata)
    pipe = StreamPipeline("a", model, adapt=True, learn_rate=0.05)
    pipe.start_video("x", TYPE)
    h = {"video": "x", "type": TYPE}
    for i in range(400):
        pipe.process(v.image[i], dict(h, frame=i, obstacle=int(obs[i])))
    snap = pipe.model.mean.copy()
    assert not np.array_equal(snap, model.mean)  # it did adapt (on its private copy)
    pipe.detector.active[0] = 1  # an alarm is active ...
    pipe.detector.clear_thr[:] = -1e9  # ... and stays so
    for i in range(400, 600):
        pipe.process(v.image[i], dict(h, frame=i, obstacle=int(obs[i])))
    assert np.array_equal(snap, pipe.model.mean)


def test_lost_frames_give_a_sensor_alarm(model):
    pipe = StreamPipeline("a", model)
    pipe.start_video("x", TYPE)
    ev = pipe.note_lost(5, {"video": "x", "type": TYPE, "frame": 10, "t_ns": 7})
    assert len(ev) == 1 and ev[0].kind == "sensor" and ev[0].features["lost"] == 5.0
    verdict = pipe.end_video()
    assert verdict.anomalous and verdict.score > 1.0 and verdict.kinds == ["sensor"]


@pytest.mark.parametrize("path", ["frames", "block"])
def test_end_of_video_clears_refer_to_the_last_handled_frame(model, path):
    """An alarm still active at the video's end is cleared at the last frame handled: its
    index and ``t_ns`` from the header, not the count of frames (frames were lost), frame
    by frame and in blocks alike."""
    v = simulate_video(TYPE, 950, 40)
    obs = obstacle_states(v.metadata)
    pipe = StreamPipeline("ws1", model)
    pipe.start_video("x", TYPE)
    header = {"video": "x", "type": TYPE, "frame": 100, "t_ns": 5_000}
    assert pipe.note_lost(100, header)  # frames 0..99 lost: the sensor alarm, still active
    if path == "frames":
        for i in range(40):
            pipe.process(v.image[i], dict(header, frame=100 + i, t_ns=5_000 + 7 * i,
                                          obstacle=int(obs[i])))
    else:
        pipe.process_block(v.image, obs, header, t_ns=[5_000 + 7 * i for i in range(40)])
    *clears, verdict = pipe.end_video_events()
    assert clears and {a.kind for a in clears} >= {"sensor"}
    assert all(isinstance(a, Alarm) and a.state == "clear" for a in clears)
    assert {(a.frame, a.t_frame_ns) for a in clears} == {(139, 5_000 + 7 * 39)}
    assert isinstance(verdict, Verdict) and verdict.frames == 40


def test_self_calibration_without_model_then_judges_what_it_can(caplog):
    """No model: the first 4000 frames calibrate (nothing judged, nothing raised), the rest
    of the same video is judged by what one video can calibrate, and says so: a frozen
    camera after calibration raises sensor at once, the normal frames before it nothing."""
    onset, end = 5000, 5050
    v = simulate_video(TYPE, 500, 6000, Anomaly("frame_freeze", onset, end, 1.0))
    pipe = StreamPipeline("a", None, calibration_frames=4000)
    obs = obstacle_states(v.metadata)
    events, evidence, status = [], None, None
    with caplog.at_level("WARNING"):
        pipe.start_video("x", TYPE)
        assert pipe.status()["mode"] == "calibrating"
        for i, f in enumerate(v.image):
            events.extend(pipe.process(f, {"video": "x", "type": TYPE, "frame": i,
                                           "obstacle": int(obs[i])}))
            if i == 3998:
                assert pipe.status()["mode"] == "calibrating"
            if i == onset - 1:
                status = pipe.status()
                evidence = status["evidence"]
    assert "SELF-CALIBRATING" in caplog.text
    assert status["mode"] == "scoring" and status["model"] == "self-calibrated"
    # it says how much footage it learned from, and that one video cannot calibrate the
    # groups whose level differs between videos (it keeps collecting for them)
    cal = status["calibration"]
    assert cal["videos"] == 1 and cal["seconds"] == 4.0 and cal["collecting"]
    assert {"intensity_low", "trajectory", "frequency"} <= set(cal["not_judged"])
    assert "4000 frames (4.0 s, 1 video(s)" in caplog.text and "NOT judged" in caplog.text
    assert set(evidence) == set(ALARM_KINDS) and max(evidence.values()) < 1.0
    raises = [(e.frame, e.kind) for e in events if isinstance(e, Alarm) and e.state == "raise"]
    assert raises and raises[0] == (onset + 2, "sensor"), raises
    assert all(onset <= f <= end + 100 for f, _ in raises), raises
    verdict = pipe.end_video()
    assert verdict.anomalous and verdict.kinds == ["sensor"]


def test_self_calibration_keeps_calibrating_over_videos_without_false_alarms(caplog):
    """A self-calibrating stream goes on collecting the type's videos and refits beside the
    stream: the footage it learned from grows in status and the log, whole videos are held
    out from three on, more groups become judged, normal videos raise nothing, and the
    camera and a stall are caught from the first model on."""
    pipe = StreamPipeline("s", None, calibration_frames=4000)
    faults = {2: Anomaly("scanner_stall", 2000, 2100, 0.0),
              3: Anomaly("frame_freeze", 2000, 2050, 1.0),
              10: Anomaly("power_drop", 2000, 2300, -0.35)}
    seen = []
    with caplog.at_level("WARNING"):
        for k in range(11):
            v = simulate_video(TYPE, 520 + k, 4000, faults.get(k))
            events = _run(pipe, v, f"{k:04d}")
            raises = [(e.frame, e.kind) for e in events if isinstance(e, Alarm)
                      and e.state == "raise"]
            if k in (2, 3):
                want = "stall" if k == 2 else "sensor"
                assert raises and raises[0][1] == want and raises[0][0] - 2000 <= 20, raises
            elif k == 10:  # by now the image of the spot against its own past is judged
                assert raises and 0 <= raises[0][0] - 2000 <= 20, raises
            else:
                assert raises == [], (k, raises)
            if k == 10:
                break
            cal = pipe.status().get("calibration")
            seen.append(None if cal is None else (cal["videos"], len(cal["not_judged"]),
                                                  cal["heldout"]))
    assert seen[0] is None  # the calibration video
    videos = [s[0] for s in seen[1:]]
    assert videos == sorted(videos) and videos[-1] >= 6
    assert seen[-1][1] < seen[1][1]  # more judged than by the one-video model
    assert "whole video" in seen[-1][2]
    assert "video(s), 3 whole video(s) held out" in caplog.text


def test_videos_too_short_to_be_workpieces_are_not_collected_for_self_calibration():
    """A flood of one-frame videos between two real ones: the refit after the second real
    video is of the two workpieces alone. Before, each one-frame video was a collected
    video, so each refit was a fit of hundreds of tiny videos (seconds) that the next
    video's first frame waited for: a flood of video names froze the stream."""
    from lhtstream.service.pipeline import MIN_WORKPIECE_FRAMES

    pipe = StreamPipeline("s", None, calibration_frames=1000)
    _run(pipe, simulate_video(TYPE, 530, 2000), "0000")
    blip = simulate_video(TYPE, 531, MIN_WORKPIECE_FRAMES - 1)
    for k in range(300):
        _run(pipe, blip, f"blip{k}")
    _run(pipe, simulate_video(TYPE, 532, 2000), "0001")
    _run(pipe, simulate_video(TYPE, 533, 1500), "0002")
    pipe.start_video("0003", TYPE)  # the refit after 0001 is taken here (see `_model_for`)
    training = pipe.self_calibrated[TYPE].training
    assert training["videos"] == 2 and training["frames"] == 4000, training


def test_blank_frame_is_sensor_but_faint_frame_is_stall(model):
    """All-zero frame: camera fault (sensor). Nothing above threshold but not all zero
    (a stopped spot heats nothing new): judged as a stall, no sensor alarm."""
    v = simulate_video(TYPE, 600, 1200, windows=[])
    for fill, want, unwanted in ((0, "sensor", "stall"), (2, "stall", "sensor")):
        img = v.image.copy()
        img[800:860] = fill  # 2 counts: below the feature threshold, above zero
        pipe = StreamPipeline("s", model)
        pipe.start_video("f", TYPE)
        raises = []
        for i, frame in enumerate(img):
            for e in pipe.process(frame, {"video": "f", "type": TYPE, "frame": i, "obstacle": 0}):
                if isinstance(e, Alarm) and e.state == "raise":
                    raises.append((e.frame, e.kind))
        kinds = {k for f, k in raises if 800 <= f <= 830}
        assert want in kinds and unwanted not in kinds, (fill, raises)
        assert all(f >= 800 for f, _ in raises), raises


@pytest.mark.parametrize("gap", [1, 3, 7, 25])
def test_lost_frames_are_a_sensor_event_and_nothing_else(model, gap):
    """Frames lost in transport (a seq gap the monitor reports with note_lost): the
    tracker and cycle comb count them, so the frames after the gap are neither a
    trajectory nor a frequency fault, and the phase stays on the simulator's truth."""
    v = simulate_video(TYPE, 700, FRAMES)
    obs = obstacle_states(v.metadata)
    holes = {1200: gap, 2100: gap}  # first lost frame -> frames lost (outside obstacle windows)
    pipe = StreamPipeline("g", model)
    pipe.start_video("g", TYPE)
    raises, phase_err = [], []
    i = 0
    while i < FRAMES:
        header = {"video": "g", "type": TYPE, "frame": i, "t_ns": i, "obstacle": int(obs[i])}
        if i in holes:
            i += holes[i]
            header.update(frame=i, obstacle=int(obs[i]))
            raises += [(a.frame, a.kind) for a in pipe.note_lost(holes[i - gap], header)]
        raises += [(a.frame, a.kind) for a in pipe.process(v.image[i], header)
                   if isinstance(a, Alarm) and a.state == "raise"]
        if any(h + gap <= i < h + gap + 30 for h in holes):
            d = (pipe.ring.latest(1)[0][F.PHASE] - v.truth["phase"][i] + 5.0) % 10.0 - 5.0
            phase_err.append(abs(d))
        i += 1
    # one sensor episode per gap, raised on the first frame after it, and nothing else
    assert raises == [(1200 + gap, "sensor"), (2100 + gap, "sensor")], raises
    assert max(phase_err) < 0.5, f"phase off by {max(phase_err):.2f} frames after the gap"
    verdict = pipe.end_video()
    assert verdict.kinds == ["sensor"]


def test_a_block_of_frames_gives_what_frame_by_frame_gives(model):
    """`process_block` (the offline / queued path) runs the monitor's per-frame kernel:
    the same alarms at the same frames with the same scores, the same verdict, and
    feature rows equal to the batch `video_features` bit for bit."""
    v = simulate_video(TYPE, 901, FRAMES, "power_drop")
    obs = obstacle_states(v.metadata)
    one = StreamPipeline("a", model)
    one.start_video("v", TYPE)
    events, rows = [], []
    for i, frame in enumerate(v.image):
        events += one.process(frame, {"video": "v", "type": TYPE, "frame": i, "t_ns": 5,
                                      "obstacle": int(obs[i])})
        rows.append(one.ring.latest(1)[0].copy())
    events += one.end_video_events()
    block = StreamPipeline("a", model)
    level = np.full(FRAMES, np.nan)
    got = block.process_block(v.image, obs, {"video": "v", "type": TYPE, "frame": 0, "t_ns": 5},
                              level=level)
    got += block.end_video_events()
    alarms = [e for e in events if isinstance(e, Alarm)]
    assert any(a.state == "raise" for a in alarms)
    assert got == events  # dataclass equality: every field, scores included
    assert np.array_equal(np.array(rows), video_features(v.image, obs), equal_nan=True)
    assert np.isfinite(level).all() and level.max() > 1.0  # the raised alarm crossed 1.0
