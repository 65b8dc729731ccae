"""One stream's processing: features -> ring buffer -> normality model -> detector.

`StreamPipeline` is plain Python owning all per-stream state. The live
monitor (frames from ZeroMQ) and offline evaluation (frames from files) both
drive it, so their scores are the same code path. Per frame it calls three
Numba kernels (features, scoring, detector) on preallocated arrays and
returns a shared empty tuple unless something happened.

Without a model for the stream's workpiece type the pipeline *self-calibrates*:
it collects the first `calibration_frames` frames (default 10 s) of that type,
fits a model on the first 75% of each video's collected frames, calibrates
thresholds on the last 25%, then scores. This is logged as a warning and
shown by `status()`; nothing is judged (no alarms, verdicts marked
`calibrating`) until it is done.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from lhtstream.kernels import features as F
from lhtstream.kernels.features import (
    DEFAULT_THRESHOLD,
    MEASURED,
    N_FEATURES,
    OBSTACLE,
    FeatureExtractor,
    RingBuffer,
    track_step,
)
from lhtstream.model.detector import (
    ALARM_KINDS,
    K_SENSOR,
    KIND_OF_GROUP,
    Alarm,
    Detector,
    Verdict,
    calibrate,
)
from lhtstream.model.normality import (
    DEFAULT_LEARN_RATE,
    GROUPS,
    N_GROUPS,
    NormalityModel,
)

log = logging.getLogger("lhtstream.service.pipeline")

DEFAULT_CALIBRATION_FRAMES = 10_000  # 10 s at 1 kHz
HOLDOUT_FRACTION = 0.25
NO_EVENTS: tuple = ()

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
        self.extractor = FeatureExtractor(threshold=threshold, capacity=ring_capacity)
        self.ring: RingBuffer = self.extractor.ring
        self.self_calibrated: dict[int, NormalityModel] = {}
        self._scores = np.zeros(N_GROUPS)
        self._work = np.zeros(32)
        self._row = np.zeros(N_FEATURES)
        self._mstate = NormalityModel.new_state()
        self._active_model: NormalityModel | None = None
        self._slot = -1
        self.detector: Detector | None = None
        self.video: str | None = None
        self.type: int | None = None
        self.metadata: dict[str, Any] = {}
        self.frames = 0
        self.alarms_in_video = 0
        self._calib_type: int | None = None
        self._calib_buf: np.ndarray | None = None
        self._calib_n = 0
        self._calib_starts: list[int] = []
        self._video_start_in_buf = 0
        self.last_verdict: Verdict | None = None

    # ------------------------------------------------------------ video boundaries

    def start_video(self, video: str, type_id: int,
                    metadata: dict[str, Any] | None = None) -> list:
        """Begin a new video; returns the events closing an unfinished previous one."""
        events = self.end_video_events() if self.video is not None else []
        self.video = str(video)
        self.type = int(type_id)
        self.metadata = dict(metadata or {})
        self.frames = 0
        self.alarms_in_video = 0
        self.extractor.reset()
        self._mstate[:] = 0.0
        model = self._model_for(self.type)
        self._active_model = model
        if model is None:
            self._slot = -1
            self.detector = None
            self._begin_calibration_video()
        else:
            self._slot = model.slot(self.type)
            self.detector = Detector.for_model(model, self.type)
        return events

    def end_video(self) -> Verdict | None:
        """Close the current video and return its verdict (None when no video is open)."""
        events = self.end_video_events()
        return events[-1] if events else None

    def end_video_events(self) -> list:
        """Close the current video: `clear` events for alarms still active, then the verdict."""
        if self.video is None:
            return []
        events: list = []
        det = self.detector
        if det is not None:
            for k in np.flatnonzero(det.active):
                events.append(self._alarm(int(k), "clear", None, self.frames - 1, 0))
            verdict = Verdict(self.stream, self.video, int(self.type), self.frames,
                              det.video_score, det.anomalous(), self.alarms_in_video,
                              sorted(det.kinds_raised))
        else:
            verdict = Verdict(self.stream, self.video, int(self.type), self.frames, 0.0, False,
                              0, ["calibrating"])
        events.append(verdict)
        self.last_verdict = verdict
        self.video = None
        self.detector = None
        return events

    # ------------------------------------------------------------ per frame

    def _check_video(self, header: dict[str, Any]) -> list | None:
        video = str(header["video"])
        type_id = int(header["type"])
        if video != self.video or type_id != self.type:
            return self.start_video(video, type_id, None)
        return None

    def process(self, frame: np.ndarray, header: dict[str, Any]) -> tuple | list:
        """Features, score and detector for one frame (uint16 2-D); returns events or ()."""
        pre = self._check_video(header)
        row = self.extractor.push(frame, int(header.get("obstacle", 0)))
        events = self._after_features(row, header)
        if pre:
            return pre + list(events)
        return events

    def process_measured(self, row: np.ndarray, header: dict[str, Any]) -> tuple | list:
        """Like `process` from a measured row (columns X..SPREAD, e.g. with perturbed X/Y)."""
        pre = self._check_video(header)
        r = self._row
        r[:] = np.nan
        for c in MEASURED:
            r[c] = row[c]
        r[OBSTACLE] = float(header.get("obstacle", 0))
        track_step(self.extractor.state, r)
        stored = self.ring.push(r)
        events = self._after_features(stored, header)
        if pre:
            return pre + list(events)
        return events

    def process_rows(self, rows: np.ndarray, header: dict[str, Any]) -> list:
        """Score already-tracked feature rows (a whole video from `video_features`), all events."""
        h = dict(header)
        out: list = list(self._check_video(h) or [])
        for i in range(len(rows)):
            h["frame"] = i
            stored = self.ring.push(rows[i])
            ev = self._after_features(stored, h)
            if ev:
                out.extend(ev)
        return out

    def note_lost(self, n: int, header: dict[str, Any]) -> tuple | list:
        """`n` frames never arrived (a seq gap): a sensor alarm unless one is active."""
        if self.detector is None or n <= 0:
            return NO_EVENTS
        if self.detector.lost(int(n)):
            self.alarms_in_video += 1
            self.detector.kinds_raised.add("sensor")
            alarm = self._alarm(K_SENSOR, "raise", header, int(header.get("frame", self.frames)),
                                int(header.get("t_ns", 0)))
            alarm.score = float(n)
            alarm.threshold = 0.0
            alarm.features["lost"] = float(n)
            return [alarm]
        return NO_EVENTS

    def _after_features(self, row: np.ndarray, header: dict[str, Any]) -> tuple | list:
        self.frames += 1
        det = self.detector
        if det is None:
            return self._calibration_row(row)
        model = self._active_model
        scored = model.score_slot(self._slot, row, self._mstate, self._scores, self._work)
        n = det.step(self._scores, scored)
        if self.adapt and scored and not det.active.any():
            model.learn_slot(self._slot, row, self._mstate, self._work, self.learn_rate)
        if n == 0:
            return NO_EVENTS
        events = []
        frame = int(header.get("frame", self.frames - 1))
        t_ns = int(header.get("t_ns", 0))
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
        return self.self_calibrated.get(type_id)

    def _begin_calibration_video(self) -> None:
        if self._calib_type != self.type:
            self._calib_type = self.type
            self._calib_buf = np.zeros((self.calibration_frames, N_FEATURES))
            self._calib_n = 0
            self._calib_starts = []
            log.warning("stream %s: no model for Type%d: SELF-CALIBRATING on the first %d "
                        "frames (%.1f s) of this type; no alarms until then", self.stream,
                        self.type, self.calibration_frames, self.calibration_frames / 1000)
        self._calib_starts.append(self._calib_n)
        self._video_start_in_buf = self._calib_n

    def _calibration_row(self, row: np.ndarray) -> tuple | list:
        buf = self._calib_buf
        buf[self._calib_n] = row
        self._calib_n += 1
        if self._calib_n < self.calibration_frames:
            return NO_EVENTS
        self._finish_calibration()
        return NO_EVENTS

    def _finish_calibration(self) -> None:
        t = int(self._calib_type)
        buf = self._calib_buf[: self._calib_n]
        bounds = self._calib_starts + [self._calib_n]
        train, held = [], []
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            seg = buf[a:b]
            if len(seg) < 200:
                train.append((t, seg))
                continue
            cut = int(len(seg) * (1.0 - HOLDOUT_FRACTION))
            train.append((t, seg[:cut]))
            held.append((t, seg[cut:]))
        model = NormalityModel.fit(train)
        calibrate(model, held or train)
        model.training["self_calibrated"] = True
        self.self_calibrated[t] = model
        log.warning("stream %s: self-calibration of Type%d done on %d frames; scoring now",
                    self.stream, t, self._calib_n)
        # bring this video's scoring state up to date with the frames seen so far
        self._active_model = model
        self._slot = model.slot(t)
        self._mstate[:] = 0.0
        model.score_rows(t, buf[self._video_start_in_buf:], self._mstate)
        self.detector = Detector.for_model(model, t)
        self._calib_type = None
        self._calib_buf = None

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
        if calibrating:
            st["calibration_progress"] = self._calib_n / self.calibration_frames
        if self.detector is not None:
            st["alarms_active"] = [ALARM_KINDS[k] for k in np.flatnonzero(self.detector.active)]
            # for live displays (`lhtstream view`): how close each kind is to raising
            st["evidence"] = {k: round(v, 3) for k, v in self.detector.kind_levels().items()}
        return st
