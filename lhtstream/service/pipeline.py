"""One stream's processing: features -> ring buffer -> normality model -> detector.

`StreamPipeline` is plain Python owning all per-stream state: four preallocated
arrays (`lhtstream.kernels.step`: state, REPEAT reference, ring, the model
table) that one compiled call per frame, `frame_step`, carries from pixels to
"did an alarm kind change". Python builds events (`Alarm`, `Verdict`: typed, with
frame and time filled in) only when one did; otherwise `process` returns the shared
empty tuple `NO_EVENTS`. Where frames queue
(offline files, a burst) `process_block` runs the same kernel over many frames
in one call, stopping at each frame with a change. The live monitor (frames
from ZeroMQ) and offline evaluation (frames from files) both drive it, so their
scores are the same code path.

Without a model for the stream's workpiece type the pipeline *self-calibrates*:
it collects the first `calibration_frames` frames (default 10 s) of that type,
fits a model on them and calibrates thresholds (`service.training.fit_collected`)
on a thread, while the stream's frames keep being handled, and scores from
`FIT_FRAMES` frames later on (0.5 s; the same frame live and offline). Nothing is
judged (no alarms, verdicts marked `calibrating`) until then. Ten seconds are
usually one video: they teach how a video varies within itself, not how normal
videos differ from each other (laser power, spot size, placement, scanner
frequency), so that first model judges only the groups one video can calibrate
(the video against its own past, the cycle comb, stalls, the camera) and leaves
the population groups unjudged. The stream then *keeps calibrating*: it goes on
collecting the type's videos and refits beside the stream after each one (a
refit is used from the type's second video after it on) until its model judges
every group from at least `SELF_CALIBRATION_VIDEOS` whole videos, or its buffer
(`COLLECT_LIMIT` x calibration_frames rows) is full. From six whole videos on,
every other one is held out whole; a group is judged once its held-out footage shows
enough excursions to bound its threshold at the promised false-alarm rate
(`detector.calibrate`). The log and `status()` say how much footage the model
learned from and what it does not judge yet.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from lhtstream.io.events import Event
from lhtstream.kernels import features as F
from lhtstream.kernels.features import (
    DEFAULT_THRESHOLD,
    N_FEATURES,
    FeatureError,
    RingBuffer,
    new_track_state,
)
from lhtstream.kernels.scoring import ADAPT_MEAN_SD, ADAPT_VAR_RATIO, REF_BOUND
from lhtstream.kernels.step import (
    FRAMES,
    MEASURED_ROWS,
    STREAM,
    block,
    feature_step,
    frame_step,
    lost_frames,
)
from lhtstream.model.detector import (
    ALARM_KINDS,
    K_SENSOR,
    KIND_OF_GROUP,
    Alarm,
    Detector,
    Verdict,
)
from lhtstream.model.normality import (
    DEFAULT_LEARN_RATE,
    GROUPS,
    N_GROUPS,
    NormalityModel,
    adaptation_extent,
    reference_shift,
)
from lhtstream.service.training import BackgroundFit

log = logging.getLogger("lhtstream.service.pipeline")

DEFAULT_CALIBRATION_FRAMES = 10_000  # 10 s at 1 kHz
FIT_FRAMES = 500
"""Frames a self-calibration fit runs beside (0.5 s at 1 kHz; at most a tenth of the
calibration): scoring starts this many frames after the last calibration frame, live and
offline alike, so the same footage gives the same alarms whatever the machine's speed."""
SELF_CALIBRATION_VIDEOS = 6
"""Whole videos of a type a self-calibrating stream collects at least (three to fit, three
held out whole); it goes on while some group cannot be judged yet."""
COLLECT_LIMIT = 12
"""A type's collection holds at most this many times `calibration_frames` rows (bounded
memory: 120 s of features, 21 MB, at the default; freed when done)."""
MIN_WORKPIECE_FRAMES = 200
"""A video is a workpiece once it has this many frames (0.2 s at 1 kHz; the data set's
videos have thousands). A shorter one is not collected for self-calibration: a flood of
one-frame videos would otherwise make every refit one of thousands of tiny videos
(seconds of fitting that the next video waits for)."""
MAX_COAST_FRAMES = 1_000
"""Longest seq gap (frames) the tracker and scoring state coast over; after a longer one
they restart as at a video's start (phase lock, centre and warm-up anew)."""
NO_EVENTS: tuple[Event, ...] = ()
"""What `process` returns when nothing happened (shared: nothing allocated per frame)."""
_FRAME_PIXELS = 32 * 32  # the camera's frame: the REPEAT reference grows for larger ones
_U16 = np.dtype(np.uint16)
_NO_LEVEL = np.zeros(0)  # the unused inputs and outputs of the block kernel
_NO_FRAMES = np.zeros((0, 1, 1), dtype=np.uint16)
_NO_ROWS = np.zeros((0, N_FEATURES))

# (name in Alarm.features, feature column) reported with each alarm
_FEATURE_REPORT = tuple((name.lower(), int(getattr(F, name))) for name in
                        ("X", "Y", "INTENSITY", "PEAK", "AREA", "PHASE", "RATE", "OBSTACLE"))


def offline_header(stream: str, video: str, type_id: int) -> dict[str, Any]:
    """A frame header with the fields the monitor's pipeline reads from the wire (for files)."""
    return {"stream": stream, "video": str(video), "type": int(type_id), "frame": 0,
            "t_ns": 0, "obstacle": 0}


class StreamPipeline:
    """Per-stream state and the per-frame path; see the module docstring."""

    def __init__(self, stream: str, model: NormalityModel | None = None,
                 calibration_frames: int = DEFAULT_CALIBRATION_FRAMES, adapt: bool = True,
                 learn_rate: float = DEFAULT_LEARN_RATE, threshold: float = DEFAULT_THRESHOLD,
                 ring_capacity: int = 4096) -> None:
        self.stream = str(stream)
        # a private copy: online adaptation of one stream must not leak into another
        self.model = model.copy() if model is not None else None
        self.calibration_frames = int(calibration_frames)
        self.adapt = bool(adapt)
        self.learn_rate = float(learn_rate)
        self.state = np.zeros(STREAM.size)
        STREAM.set(self.state, threshold=float(threshold), adapt=1.0 if self.adapt else 0.0,
                   learn_rate=self.learn_rate, ring_capacity=int(ring_capacity))
        self._track_start = new_track_state()
        self._prev = np.zeros(_FRAME_PIXELS, dtype=np.uint16)
        self._shape: tuple[int, ...] | None = None
        self.ring = RingBuffer(ring_capacity, N_FEATURES,
                               count=STREAM.part(self.state, "ring_total"))
        self._ring = self.ring.buffer.reshape(-1)  # the kernels' flat view
        self._det_state = STREAM.part(self.state, "det")
        self._score_state = STREAM.part(self.state, "score")
        self._track_state = STREAM.part(self.state, "track")
        self.self_calibrated: dict[int, NormalityModel] = {}
        self._active_model: NormalityModel | None = None
        self._table: np.ndarray | None = None  # the active model's table while scoring
        self._trained: np.ndarray | None = None  # ... and that model as fitted (bounds learning)
        self.detector: Detector | None = None
        self.video: str | None = None
        self.type: int | None = None
        self.metadata: dict[str, Any] = {}
        self.frames = 0
        # the last handled frame's index and t_ns (None: the header had none): an
        # end-of-video `clear` refers to it (after lost frames, `frames` is not its index)
        self._last_frame: int | None = None
        self._last_t_ns = 0
        self.alarms_in_video = 0
        self._fits: dict[int, BackgroundFit] = {}  # self-calibration fits under way
        self._collections: dict[int, _Collection] = {}  # self-calibrating types' footage
        self._collecting: _Collection | None = None  # the current video's, if collected
        self.last_verdict: Verdict | None = None

    # ------------------------------------------------------------ video boundaries

    def start_video(self, video: str, type_id: int,
                    metadata: dict[str, Any] | None = None) -> list[Event]:
        """Begin a new video; returns the events closing an unfinished previous one."""
        events = self.end_video_events() if self.video is not None else []
        self.video = str(video)
        self.type = int(type_id)
        self.metadata = dict(metadata or {})
        self.frames = 0
        self._last_frame, self._last_t_ns = None, 0
        self.alarms_in_video = 0
        # a new workpiece after an unknown pause: no phase lock, centre or REPEAT
        # reference carries over, and the ring's history starts again (no memset: the
        # ring only shows rows pushed since)
        self._restart_tracking()
        self._prev[:] = 0
        self.ring.clear()
        model = self._model_for(self.type)
        self._collecting = None
        coll = self._collections.get(self.type)
        if coll is not None:
            coll.count_video()
        if model is None:
            self._active_model = None
            self._table = None
            self.detector = None
            self._begin_calibration_video()
        else:
            self._use(model)
            if coll is not None and coll.wants_more(model):
                coll.begin_video()
                self._collecting = coll
        return events

    def _restart_tracking(self) -> None:
        self._track_state[:] = self._track_start
        self._score_state[:] = 0.0

    def _use(self, model: NormalityModel) -> None:
        """Score the current video with `model` from the next frame on (fresh detector)."""
        slot = model.slot(self.type)
        self._active_model = model
        self._table = model.table
        self._trained = model.trained
        STREAM.set(self.state, slot=slot)
        self.detector = Detector(model.raise_thr[slot], model.clear_thr[slot],
                                 float(model.video_thr[slot]), state=self._det_state)

    def close(self) -> None:
        """Stop this stream's background fits (waiting for their threads): the pipeline is
        being dropped, and a fit left running would outlive it."""
        for fit in self._fits.values():
            fit.cancel()
        self._fits.clear()

    def end_video(self) -> Verdict | None:
        """Close the current video and return its verdict (None when no video is open)."""
        events = self.end_video_events()
        return events[-1] if events and isinstance(events[-1], Verdict) else None

    def end_video_events(self) -> list[Event]:
        """Close the current video: `clear` events for alarms still active (at the last
        handled frame: its index and ``t_ns``), then the verdict."""
        if self.video is None:
            return []
        events: list[Event] = []
        det = self.detector
        if det is not None:
            last = self.frames - 1 if self._last_frame is None else int(self._last_frame)
            for k in np.flatnonzero(det.active):
                events.append(self._alarm(int(k), "clear", None, last, int(self._last_t_ns)))
            verdict = Verdict(self.stream, self.video, int(self.type), self.frames,
                              det.video_score, det.anomalous(), self.alarms_in_video,
                              sorted(det.kinds_raised))
        else:
            verdict = Verdict(self.stream, self.video, int(self.type), self.frames, 0.0, False,
                              0, ["calibrating"])
        events.append(verdict)
        self.last_verdict = verdict
        coll = self._collecting
        if coll is not None:
            coll.end_video()
            self._collecting = None
            self._refit(coll)
        self.video = None
        self.detector = None
        self._table = None
        return events

    # ------------------------------------------------------------ per frame

    def _check_video(self, header: dict[str, Any]) -> list[Event] | None:
        video = str(header["video"])
        type_id = int(header["type"])
        if video != self.video or type_id != self.type:
            return self.start_video(video, type_id, None)
        return None

    def _check_frame(self, frame: Any) -> None:
        """A frame of a new shape or an unexpected type: validate, reset the REPEAT reference."""
        if not isinstance(frame, np.ndarray) or frame.dtype != _U16 or frame.ndim != 2:
            raise FeatureError(f"frame must be a 2-D uint16 array, got "
                               f"{getattr(frame, 'dtype', type(frame).__name__)} "
                               f"{getattr(frame, 'shape', '')}")
        if frame.size > self._prev.size:
            self._prev = np.zeros(frame.size, dtype=np.uint16)
        # new ROI: only happens at a video boundary (a REPEAT needs the same pixels)
        self._prev[:] = 0
        self._shape = frame.shape

    def process(self, frame: np.ndarray, header: dict[str, Any]) -> Sequence[Event]:
        """One frame (uint16, rows x cols) with its header (video, type, frame, t_ns,
        obstacle): features -> ring -> score -> detect -> learn in one compiled call;
        returns the events (alarms raised/cleared, a previous video's verdict) in a list,
        or `NO_EVENTS`."""
        pre = None
        if header["video"] != self.video or header["type"] != self.type:
            pre = self._check_video(header)
        if frame.shape != self._shape or frame.dtype is not _U16:
            self._check_frame(frame)
        self.frames += 1
        self._last_frame = header.get("frame")
        self._last_t_ns = header.get("t_ns", 0)
        events: Sequence[Event]
        if self._table is not None:
            if frame_step(frame, header.get("obstacle", 0), self._prev, self._ring,
                          self.state, self._table, self._trained):
                events = self._events(int(header.get("frame", self.frames - 1)),
                                      int(header.get("t_ns", 0)))
            else:
                events = NO_EVENTS
            if self._collecting is not None:
                self._collecting.add(self.ring.latest(1))
        else:
            feature_step(frame, header.get("obstacle", 0), self._prev, self._ring, self.state)
            events = self._calibration_row(self.ring.latest(1)[0])
        if pre:
            return pre + list(events)
        return events

    def process_block(self, frames: np.ndarray, obstacles: np.ndarray, header: dict[str, Any],
                      t_ns: Sequence[int] | np.ndarray | None = None,
                      level: np.ndarray | None = None) -> list[Event]:
        """Consecutive frames (n, rows, cols) uint16 of one video with their obstacle states
        (n,): the same step as `process` frame by frame, in as few compiled calls as there
        are frames with an alarm-kind change (plus one). `header` is the first frame's
        (video, type, frame index, t_ns); frame i is frame ``header["frame"] + i`` with
        ``t_ns[i]`` (default: the header's). `level` (n,) float gets each judged frame's
        highest smoothed score / raise threshold (float64, contiguous: it is written in
        place). Returns all events, in frame order."""
        if not isinstance(frames, np.ndarray) or frames.dtype != _U16 or frames.ndim != 3:
            raise FeatureError(f"frames must be a (n, rows, cols) uint16 array, got "
                               f"{getattr(frames, 'dtype', type(frames).__name__)} "
                               f"{getattr(frames, 'shape', '')}")
        n = frames.shape[0]
        obstacles = _block_column(obstacles, n, "obstacle states")
        events: list[Event] = list(self._check_video(header) or [])
        if n == 0:
            return events
        frames = np.ascontiguousarray(frames)
        if frames.shape[1:] != self._shape:
            self._check_frame(frames[0])
        first = int(header.get("frame", self.frames))
        t0 = int(header.get("t_ns", 0))
        self._last_frame = first + n - 1
        self._last_t_ns = t0 if t_ns is None else int(t_ns[n - 1])
        if level is not None and (not isinstance(level, np.ndarray) or level.dtype != np.float64
                                  or level.shape != (n,) or not level.flags.c_contiguous):
            raise FeatureError(f"level must be a contiguous float64 array of shape ({n},)")
        out = _NO_LEVEL if level is None else level
        i = 0
        while i < n:
            if self._table is None:  # calibrating: one frame at a time, into the buffer
                self.frames += 1
                feature_step(frames[i], obstacles[i], self._prev, self._ring, self.state)
                events.extend(self._calibration_row(self.ring.latest(1)[0]))
                if level is not None:
                    out[i] = np.nan
                i += 1
                continue
            if self._collecting is None:
                j = block(FRAMES, frames, _NO_ROWS, obstacles, i, self._prev, self._ring,
                          self.state, self._table, self._trained, out)
            else:  # no more frames per call than the ring holds: their rows are collected
                end = min(n, i + self.ring.capacity)
                j = block(FRAMES, frames[:end], _NO_ROWS, obstacles[:end], i, self._prev,
                          self._ring, self.state, self._table, self._trained,
                          out if level is None else out[:end])
                self._collecting.add(self.ring.latest(min(j + 1, end) - i))
                if j == end and end < n:  # the chunk ended, not an alarm change
                    self.frames += end - i
                    i = end
                    continue
            self.frames += min(j + 1, n) - i
            if j < n:
                events.extend(self._events(first + j, t0 if t_ns is None else int(t_ns[j])))
            i = j + 1
        return events

    def process_measured(self, measured: np.ndarray, obstacles: np.ndarray,
                         header: dict[str, Any]) -> list[Event]:
        """Like `process_block` from measured rows (n, N_FEATURES; the `MEASURED` columns, e.g.
        with perturbed X/Y, as in the KDE-AMD protocol): track -> score -> detect -> learn."""
        rows = np.ascontiguousarray(measured, dtype=np.float64)
        if rows.ndim != 2 or rows.shape[1] != N_FEATURES:
            raise FeatureError(f"rows must have shape (n, {N_FEATURES}), got {rows.shape}")
        n = rows.shape[0]
        obstacles = _block_column(obstacles, n, "obstacle states")
        events: list[Event] = list(self._check_video(header) or [])
        if self._table is None:
            raise FeatureError("no model for this type yet: rows can only be scored with one")
        first = int(header.get("frame", 0))
        t0 = int(header.get("t_ns", 0))
        if n:
            self._last_frame, self._last_t_ns = first + n - 1, t0
        i = 0
        while i < n:
            j = block(MEASURED_ROWS, _NO_FRAMES, rows, obstacles, i, self._prev, self._ring,
                      self.state, self._table, self._trained, _NO_LEVEL)
            self.frames += min(j + 1, n) - i
            if j < n:
                events.extend(self._events(first + j, t0))
            i = j + 1
        return events

    def note_lost(self, n: int, header: dict[str, Any]) -> Sequence[Event]:
        """`n` frames never arrived (a seq gap). The tracker and scoring state advance by
        `n` frames (restart after more than `MAX_COAST_FRAMES`), so the gap is not
        trajectory or frequency evidence; returns a sensor alarm unless one is active."""
        n = int(n)
        if n <= 0 or self.video is None:
            return NO_EVENTS
        if n > MAX_COAST_FRAMES:
            self._restart_tracking()
        else:
            lost_frames(n, self._table is not None, self.state)
        if self.detector is None:
            return NO_EVENTS
        if self.detector.lost(n):
            self.alarms_in_video += 1
            self.detector.kinds_raised.add("sensor")
            alarm = self._alarm(K_SENSOR, "raise", header, int(header.get("frame", self.frames)),
                                int(header.get("t_ns", 0)))
            alarm.score = float(n)
            alarm.threshold = 0.0
            alarm.features["lost"] = float(n)
            return [alarm]
        return NO_EVENTS

    def _events(self, frame: int, t_ns: int) -> list[Event]:
        """The alarm events of the frame just stepped (its kind changes)."""
        det = self.detector
        row = self.ring.latest(1)[0]
        events: list[Event] = []
        for k in np.flatnonzero(det.changed):
            state = "raise" if det.changed[k] > 0 else "clear"
            if state == "raise":
                self.alarms_in_video += 1
                det.kinds_raised.add(ALARM_KINDS[k])
            events.append(self._alarm(int(k), state, row, frame, t_ns))
        return events

    def _alarm(self, k: int, state: str, row: np.ndarray | dict | None, frame: int,
               t_ns: int) -> Alarm:
        det = self.detector
        g = int(det.which[k])
        features: dict[str, float] = {}
        if isinstance(row, np.ndarray):
            for name, col in _FEATURE_REPORT:
                features[name] = float(row[col])
        for gg in range(N_GROUPS):
            if KIND_OF_GROUP[gg] == k:
                features[f"score_{GROUPS[gg]}"] = float(det.smooth[gg])
        return Alarm(self.stream, str(self.video), int(self.type), int(frame), int(t_ns),
                     ALARM_KINDS[k], state, float(det.smooth[g]), float(det.raise_thr[g]),
                     features)

    # ------------------------------------------------------------ self-calibration

    def _model_for(self, type_id: int) -> NormalityModel | None:
        if self.model is not None and self.model.has_type(type_id) and self.model.calibrated:
            return self.model
        fit = self._fits.get(type_id)
        coll = self._collections.get(type_id)
        # the first fit: a new video waits for it; a refit is taken at the start of the
        # type's second video after the one that ended its footage (it had a whole video's
        # time to run, so this rarely waits, and where it is used does not depend on the
        # machine's speed: offline results equal live ones)
        if fit is not None and (type_id not in self.self_calibrated
                                or coll.started >= fit.use_from):
            del self._fits[type_id]
            self._adopt(fit)
            self._refit(coll)
        return self.self_calibrated.get(type_id)

    def _fit_frames(self) -> int:
        return max(1, min(FIT_FRAMES, self.calibration_frames // 10))

    def _begin_calibration_video(self) -> None:
        coll = self._collections.get(self.type)
        if coll is None:
            coll = self._collections[self.type] = _Collection(
                self.type, COLLECT_LIMIT * self.calibration_frames + self._fit_frames())
            log.warning("stream %s: no model for Type%d: SELF-CALIBRATING on the first %d "
                        "frames (%.1f s) of this type; no alarms until then", self.stream,
                        self.type, self.calibration_frames, self.calibration_frames / 1000)
        coll.begin_video()
        self._collecting = coll

    def _calibration_row(self, row: np.ndarray) -> Sequence[Event]:
        coll = self._collecting
        coll.add(row[None, :])
        n, t = coll.n, coll.type
        if n == self.calibration_frames and t not in self._fits:
            # fit on a thread; this video's frames keep coming (their rows go on filling
            # the buffer) and are scored from a fixed number of frames on
            self._fits[t] = BackgroundFit(t, coll.rows[:n], coll.starts, coll.starts[-1])
            log.warning("stream %s: fitting Type%d on %d frames beside the stream; "
                        "scoring from %d frames on", self.stream, t, n, self._fit_frames())
        elif n == self.calibration_frames + self._fit_frames():
            fit = self._fits.pop(t)
            state = self._adopt(fit)
            # this video's scoring state: the thread's, plus the frames since the fit began
            self._use(self.self_calibrated[t])
            self._score_state[:] = state
            self.self_calibrated[t].score_rows(t, coll.rows[fit.frames:n], self._score_state)
            if not coll.wants_more(self.self_calibrated[t]):
                self._collecting = None
        return NO_EVENTS

    def _refit(self, coll: _Collection) -> None:
        """After a collected video: refit the type on every whole video so far (beside the
        stream); `_Collection.wants_more` says until when."""
        t = coll.type
        if t in self._fits or t not in self.self_calibrated:
            return
        if coll.complete <= coll.fitted:
            if not coll.wants_more(self.self_calibrated[t]):
                coll.release()  # calibrated: the footage is not needed any more
            return
        n = coll.whole_rows()
        fit = BackgroundFit(t, coll.rows[:n], coll.starts[:coll.complete], None)
        fit.use_from = coll.started + 1
        self._fits[t] = fit
        coll.fitted = coll.complete

    def _adopt(self, fit: BackgroundFit) -> np.ndarray | None:
        """The fitted model of `fit` (waiting for it if need be); its scoring state."""
        waited = not fit.done()
        model, state = fit.result()
        self.self_calibrated[fit.type] = model
        tr = model.training
        left = (model.calibration.get("not_judged", [])
                + model.calibration.get("unreachable", []))
        log.warning("stream %s: self-calibration of Type%d done on %d frames (%.1f s, %d "
                    "video(s), %s held out); %s; scoring now%s", self.stream, fit.type,
                    fit.frames, fit.frames / 1000, tr.get("videos", 0),
                    tr.get("heldout", "?"),
                    f"NOT judged until more videos: {', '.join(left)}" if left
                    else "every group judged",
                    " (the fit outlasted its frames: this frame waited for it)" if waited else "")
        return state

    # ------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        """What this stream is doing, for the monitor's status message."""
        calibrating = self.detector is None and self.video is not None
        st: dict[str, Any] = {
            "mode": "calibrating" if calibrating else ("scoring" if self.video else "idle"),
            "video": self.video,
            "type": self.type,
            "model": ("file" if self._active_model is self.model and self.model is not None
                      else "self-calibrated" if self._active_model is not None else "none"),
            "self_calibrated_types": sorted(self.self_calibrated),
        }
        coll = self._collections.get(self.type) if self.type is not None else None
        if calibrating:
            n = coll.n if coll is not None else 0
            st["calibration_progress"] = min(n / self.calibration_frames, 1.0)
            # collected: the fit runs beside the stream (scoring starts FIT_FRAMES later)
            st["fitting"] = any(not fit.done() for fit in self._fits.values())
        model = self._active_model
        if model is not None and model is not self.model:
            tr = model.training
            st["calibration"] = {
                "videos": int(tr.get("videos", 0)),
                "seconds": round(tr.get("frames", 0) / 1000.0, 1),
                "heldout": tr.get("heldout"),
                # groups the footage could not calibrate yet (their threshold is inf)
                "not_judged": list(model.calibration.get("not_judged", []))
                + list(model.calibration.get("unreachable", [])),
                "collecting": coll is not None and coll.wants_more(model),
                "refitting": self.type in self._fits,
            }
        if model is not None and self.video is not None:
            st["adaptation"] = adaptation_status(model, self._table, self._trained,
                                                 int(STREAM.view(self.state).slot),
                                                 self._score_state)
        if self.detector is not None:
            st["alarms_active"] = [ALARM_KINDS[k] for k in np.flatnonzero(self.detector.active)]
            # for live displays (`lhtstream view`): how close each kind is to raising
            st["evidence"] = {k: round(v, 3) for k, v in self.detector.kind_levels().items()}
        return st


def _block_column(values: Any, n: int, what: str) -> np.ndarray:
    """A per-frame input column of a block as a contiguous (n,) int64 array (checked)."""
    a = np.ascontiguousarray(values, dtype=np.int64)
    if a.shape != (n,):
        raise FeatureError(f"{what} must have shape ({n},), got {a.shape}")
    return a


class _Collection:
    """The feature rows a self-calibrating stream collected of one type, video by video."""

    def __init__(self, type_id: int, capacity: int) -> None:
        self.type = int(type_id)
        self.rows = np.zeros((int(capacity), N_FEATURES))
        self.n = 0
        self.starts: list[int] = []  # first row of each video
        self.complete = 0  # videos collected to their end
        self.fitted = 0  # whole videos the type's latest fit was given
        self.started = 0  # videos of the type started since collecting began
        self._open = False

    def wants_more(self, model: NormalityModel) -> bool:
        """Whether to go on collecting, the type's model being `model`."""
        if self.n >= len(self.rows):
            return False
        cal = model.calibration
        unjudged = cal.get("not_judged", []) or cal.get("unreachable", [])
        return self.complete < SELF_CALIBRATION_VIDEOS or bool(unjudged)

    def begin_video(self) -> None:
        self.starts.append(self.n)
        self._open = True

    def count_video(self) -> None:
        self.started += 1

    def add(self, rows: np.ndarray) -> None:
        k = min(len(rows), len(self.rows) - self.n)
        if k < len(rows):
            self._open = False  # full: this video is not whole
        self.rows[self.n:self.n + k] = rows[:k]
        self.n += k

    def end_video(self) -> None:
        if self._open and len(self.starts) == self.complete + 1:
            if self.n - self.starts[-1] >= MIN_WORKPIECE_FRAMES:
                self.complete += 1
            else:  # no workpiece: its rows are forgotten, as if it had never been
                self.n = self.starts.pop()
        self._open = False

    def release(self) -> None:
        self.rows = np.zeros((0, N_FEATURES))

    def whole_rows(self) -> int:
        """Rows of the whole videos (the rest belongs to a video cut short)."""
        return self.starts[self.complete] if self.complete < len(self.starts) else self.n


def adaptation_status(model: NormalityModel, table: np.ndarray, trained: np.ndarray,
                      slot: int, score_state: np.ndarray) -> dict[str, Any]:
    """How far online learning moved the stream's copy of `model` from what was trained
    (type `slot`): the largest cell-mean shift in trained sd and variance ratio, against
    their bounds; and how far the stream's own reference moved since it was set, in
    within-video sd, against its bound."""
    return {
        "bound_mean_sd": ADAPT_MEAN_SD,
        "bound_var_ratio": ADAPT_VAR_RATIO,
        **adaptation_extent(table, trained, slot),
        "reference_bound_sd": REF_BOUND,
        "reference_shift_sd": reference_shift(model, score_state, slot),
    }
