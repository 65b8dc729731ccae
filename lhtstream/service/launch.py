"""Starting the monitor: the model or self-calibration (`_pipeline_factory`), the kernels
compiled before the first frame (`_warm_up`), then sockets, journal and the loop
(`serve`, what ``lhtstream monitor`` runs)."""

from __future__ import annotations

import gc
import logging
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import zmq

from lhtstream.base.errors import LhtstreamError
from lhtstream.io import protocol
from lhtstream.io.curve import Curve
from lhtstream.io.curve import client as curve_client
from lhtstream.io.curve import server as curve_server
from lhtstream.io.journal import DEFAULT_JOURNAL, Journal
from lhtstream.io.protocol import DEFAULT_FRAME_ENDPOINT
from lhtstream.kernels import features
from lhtstream.model.normality import NormalityModel
from lhtstream.service.monitor import (
    DEFAULT_IDLE_SECONDS,
    DEFAULT_MAX_STREAMS,
    Monitor,
    MonitorError,
)
from lhtstream.service.oplog import log
from lhtstream.service.pipeline import DEFAULT_CALIBRATION_FRAMES, StreamPipeline
from lhtstream.service.streams import FrameBlock
from lhtstream.service.training import cancel_background_fits

LATENCY_LOG_CAPACITY = 4_000_000
"""Frames a ``latency_log`` holds (66 min at 1 kHz, 16 min at 4 kHz; 32 MB)."""
MIN_CALIBRATION_SECONDS = 0.2
"""Shortest self-calibration: the fit needs a few hundred frames of one type."""
MAX_CALIBRATION_SECONDS = 120.0
"""Longest self-calibration (its buffer holds every feature row: 2 min is ~20 MB per stream)."""


def _pipeline_factory(
    model_path: str | None, calibration_seconds: float | None
) -> tuple[Callable[[str], Any], str, Any]:
    """A function making one pipeline per stream, a note on the model, and the model."""

    model = None
    if model_path:

        try:
            model = NormalityModel.load(model_path)
        except LhtstreamError:
            raise
        except Exception as exc:  # a corrupt file must give one line, not a traceback
            raise MonitorError(
                f"cannot load model {model_path}: {type(exc).__name__}: {exc}"
            ) from None
        note = f"model {model_path}"
        calibration_frames = 0
    else:

        seconds = calibration_seconds
        if seconds is None:
            seconds = DEFAULT_CALIBRATION_FRAMES / 1000.0
        if not MIN_CALIBRATION_SECONDS <= seconds <= MAX_CALIBRATION_SECONDS:
            raise MonitorError(
                f"calibration of {seconds:g} s: need {MIN_CALIBRATION_SECONDS:g}.."
                f"{MAX_CALIBRATION_SECONDS:g} s of footage"
            )
        calibration_frames = int(round(seconds * 1000))
        note = f"NO MODEL: self-calibrating each stream on its first {seconds:g} s"
        log(
            "WARNING: started without --model: every stream SELF-CALIBRATES on its first "
            f"{seconds:g} s of footage ({calibration_frames} frames) and raises no process "
            "alarm before that; if a stream is already faulty then, the fault becomes 'normal'"
        )

    def make(stream: str) -> Any:
        if model is not None:
            return StreamPipeline(stream, model=model)
        return StreamPipeline(stream, model=None, calibration_frames=calibration_frames)

    return make, note, model


_SYNTHETIC_VIDEO_FRAMES = 700
"""Frames of the synthetic video the warm-up runs (more than a 500-frame calibration)."""


def _synthetic_frames(n: int, rows: int = 16, cols: int = 22) -> np.ndarray:
    """``n`` difference frames (uint16, 0..1023) of a noisy Gaussian spot sweeping to and
    fro: what the kernels need to take every branch of the frame path (a spot to
    measure, motion, a fit with spread in every feature), without the data simulator."""
    rng = np.random.default_rng(0)
    t = np.arange(n, dtype=np.float64)
    x = (cols - 1) / 2 + (cols / 3) * np.sin(2 * np.pi * t / 97) + rng.normal(0, 0.3, n)
    y = (rows - 1) / 2 + (rows / 5) * np.cos(2 * np.pi * t / 61) + rng.normal(0, 0.3, n)
    peak = 600 + 150 * np.sin(2 * np.pi * t / 37) + rng.normal(0, 20, n)
    sigma = 1.8 + 0.3 * np.sin(2 * np.pi * t / 53)
    yy, xx = np.mgrid[0:rows, 0:cols]
    d2 = (xx[None] - x[:, None, None]) ** 2 + (yy[None] - y[:, None, None]) ** 2
    spot = peak[:, None, None] * np.exp(-d2 / (2 * sigma[:, None, None] ** 2))
    noise = rng.normal(0, 4, (n, rows, cols))
    return np.clip(np.rint(spot + noise), 0, 1023).astype(np.uint16)


def _warm_up(model: Any) -> None:
    """Compile (or load from cache) every kernel of the frame path before subscribing.

    Runs a short synthetic video (`_synthetic_frames`) through throw-away pipelines:
    features, model fit and scoring, detector — with the loaded model when there is one
    (for one of its types), and through a tiny self-calibration; once frame by frame off
    the wire, once in `FrameBlock`s as a burst arrives. A failure here is logged, not fatal: the
    kernels then compile on the first live frames instead.
    """

    features.warm_up()
    logger = logging.getLogger("lhtstream.service.pipeline")
    level = logger.level
    logger.setLevel(logging.ERROR)  # the throw-away pipeline's calibration notices are noise
    try:
        type_id = 1
        if model is not None and len(model.types):
            type_id = int(model.types[0])
        frames = _synthetic_frames(_SYNTHETIC_VIDEO_FRAMES)
        wire = [[bytes(p) for p in protocol.encode_frame(
            frames[i], stream="warm-up", video="warm-up", type=type_id, seq=i, index=i,
            obstacle=0)] for i in range(frames.shape[0])]
        pipes = [StreamPipeline("warm-up", calibration_frames=500)]
        if model is not None:
            pipes.append(StreamPipeline("warm-up", model=model))
        block = FrameBlock()
        for pipe in pipes:
            # frame by frame off the wire (each a block of one, as `_on_frame`), then (a
            # fresh pipeline, so self-calibration runs in blocks too) as frames queued in a
            # burst arrive
            pipe.start_video("warm-up", type_id, {})
            for parts in wire:
                message = protocol.decode(parts)
                block.start(message.header, message.payload, 0)
                block.step(pipe)
            pipe.note_lost(3, message.header)
            pipe.end_video_events()
        pipes.append(StreamPipeline("warm-up", calibration_frames=500))
        for pipe in pipes[-1:] + pipes[1:-1]:
            pipe.start_video("warm-up", type_id, {})
            at, size = 0, 50
            while at < len(wire):
                size = 51 - size  # blocks of 50 and of 1 (a `process` of a block's frame)
                for parts in wire[at:at + size]:
                    message = protocol.decode(parts)
                    if block.n:
                        block.append(message.header, message.payload, 0)
                    else:
                        block.start(message.header, message.payload, 0)
                at += block.n
                block.step(pipe)
            pipe.end_video_events()
        for pipe in pipes:
            pipe.close()  # a refit started by a video's end would outlive the warm-up
    except Exception as exc:
        log(f"warm-up incomplete ({type(exc).__name__}: {exc}); first frames may be late")
    finally:
        logger.setLevel(level)


def serve(
    *,
    frames: Sequence[str],
    publish: str,
    model: str | None = None,
    journal: str | None = None,
    status_interval: float = 1.0,
    calibration_seconds: float | None = None,
    streams: str | None = None,
    max_streams: int = DEFAULT_MAX_STREAMS,
    idle_seconds: float = DEFAULT_IDLE_SECONDS,
    latency_log: str | None = None,
    curve: Curve | None = None,
) -> int:
    """Run the monitor until SIGINT/SIGTERM (then 0): warm up, bind, subscribe, serve.

    ``frames``: endpoints to connect for frames; ``publish``: the PUB endpoint to bind;
    ``model``: a model file (None: self-calibrate each stream on ``calibration_seconds``
    of footage); ``journal``: the SQLite journal path; ``streams``: names and shell-style
    patterns of the streams to serve (None: all); ``latency_log``: write every frame's
    latency (µs, float64 ``.npy``) to this file at exit (``--latency-log``);
    ``curve``: CURVE keys (io.curve) for the frame SUB (client) and the PUB (server).
    """
    frames = list(frames) or [DEFAULT_FRAME_ENDPOINT]
    selection = protocol.StreamSelection(streams)  # a bad pattern fails before the warm-up

    t0 = time.monotonic()
    monitor: Monitor | None = None
    stop = {"flag": False}

    def _on_signal(signum: int, frame: Any) -> None:
        stop["flag"] = True
        if monitor is not None:
            monitor.stop_requested = True

    # Installed first, so a SIGTERM during the warm-up also ends in a clean exit 0.
    old_int = signal.signal(signal.SIGINT, _on_signal)
    old_term = signal.signal(signal.SIGTERM, _on_signal)
    try:
        logging.basicConfig(
            format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.INFO
        )
        make_pipeline, note, model = _pipeline_factory(model, calibration_seconds)
        _warm_up(model)
        # Everything alive now (modules, compiled kernels, the model) lives as long as
        # the process: move it out of the collector's reach, so the occasional full
        # collection walks only what the stream allocates, not ~10^5 start-up objects.
        gc.collect()
        gc.freeze()
        t_warm = time.monotonic() - t0
        journal_db = None if stop["flag"] else Journal(journal or DEFAULT_JOURNAL)
    except BaseException:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
        raise
    if journal_db is None:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
        log("stopped during start-up")
        return 0
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 1000)  # give the last status a second to leave at exit
    sub = ctx.socket(zmq.SUB)
    curve_server(curve, ctx, pub)
    curve_client(curve, sub)
    try:
        try:
            protocol.claim_ipc(publish)
            pub.bind(publish)
        except protocol.ProtocolError as exc:
            raise MonitorError(f"cannot bind --publish: {exc}") from None
        except zmq.ZMQError as exc:
            raise MonitorError(f"cannot bind --publish {publish}: {exc}") from None
        monitor = Monitor(
            make_pipeline=make_pipeline,
            journal=journal_db,
            publish=pub,
            subscribe=sub,
            status_interval=status_interval,
            model_note=note,
            streams=selection,
            max_streams=max_streams,
            idle_seconds=idle_seconds,
            latency_log=None if latency_log is None else np.zeros(LATENCY_LOG_CAPACITY),
        )
        # Subscribe only after the kernels are warm: nothing queues while we compile.
        protocol.configure_subscriber(sub, ["frame", "video"], selection)
        for endpoint in frames:
            try:
                sub.connect(endpoint)
            except zmq.ZMQError as exc:
                raise MonitorError(f"cannot connect --frames {endpoint}: {exc}") from None
        monitor.stop_requested = stop["flag"]
        monitor.watch_connections(frames)
        monitor.report_interrupted()
        log(
            f"ready in {time.monotonic() - t0:.2f} s (kernels warm after {t_warm:.2f} s); "
            f"frames of {selection} from {', '.join(frames)}, publishing on "
            f"{publish}, journal {journal_db.path} (next alarm seq {journal_db.next_seq()}); {note}"
        )
        monitor.run()
        s = monitor.status(time.monotonic_ns())
        log(
            f"stopped: frames={s['frames']} dropped={s['dropped']} malformed={s['malformed']} "
            f"errors={s['errors']} alarms={s['alarms']} verdicts={s['verdicts']} "
            f"journal={s['journal']}"
        )
        if journal_db.pending:
            log(f"WARNING: {len(journal_db.pending)} journal row(s) could not be written to "
                f"{journal_db.path} ({journal_db.last_error}); they were published only")
        if latency_log is not None:
            n = min(monitor.latency_logged, LATENCY_LOG_CAPACITY)
            np.save(latency_log, monitor.latency_log[:n])
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
        if monitor is not None and monitor.connections is not None:
            monitor.connections.close()
        sub.close(0)
        pub.close()
        if curve is not None:
            curve.close()
        journal_db.close()
        cancel_background_fits()
    return 0
