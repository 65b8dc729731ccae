"""``lhtstream demo``: the whole system in one run, on a small synthetic data set.

1. Synthesise (once, cached) a training set of normal videos and a live set with
   a few injected faults, and train a model on the normal videos.
2. Start ``lhtstream monitor`` and ``lhtstream replay`` as separate processes,
   talking over ``ipc://`` sockets in a temp folder, the replay at 1000 frames/s.
3. Subscribe to the monitor's alarms, verdicts and status; print alarms as they
   come and (on a terminal) a running line: frames, latency p99, alarms.
4. Stop both children and print a summary: each injected fault against the
   alarms raised (kind, delay in frames), the verdict per video, and per-frame
   handling latency percentiles.

The cache is ``--cache DIR``, else ``$XDG_CACHE_HOME/lhtstream/demo``, else
``~/.cache/lhtstream/demo``; a second run reuses the data and the model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zmq

import lhtstream
from lhtstream.base.errors import LhtstreamError
from lhtstream.base.stats import percentiles
from lhtstream.io.dataset import read_labels
from lhtstream.io.simulate import anomalies, params, synthesize
from lhtstream.model.detector import ALARM_KIND_FOR_ANOMALY
from lhtstream.model.normality import NormalityModel
from lhtstream.service.harness import (
    LAT_QS,
    Child,
    monitor_args,
    read_replay_summary,
    short_tempdir,
)
from lhtstream.service.training import fit_dataset

# The demo set. The cache is keyed on these, the lhtstream version and a fingerprint
# of the simulator and of the training code (`cache_keys`): change any and the next
# run rebuilds what is stale.
SETTINGS: dict[str, Any] = {
    "version": 2,
    "types": [1, 20],              # no obstacle / one obstacle window
    # 8, not 4: with 4 normal videos per type the per-video laser-power spread is
    # under-sampled and two live Type20 videos (power 7-10 % under the lowest training
    # video) raised intensity_low from their first scored frame, long before any fault
    "train_videos_per_type": 8,
    "train_frames": 3000,
    "live_videos_per_type": 3,
    "live_frames": 3000,
    "live_anomaly_rate": 0.67,     # 2 of 3 live videos per type carry a fault
    "live_anomalies": ["power_drop", "scanner_stall", "camera_dropout", "spot_defocus"],
    "train_seed": 101,
    "live_seed": 202,
}

INTERRUPTED_EXIT = 130
"""Exit status after Ctrl-C (128 + SIGINT, the shell convention); 0 after a full run."""

# Modules whose code decides what the trained model contains.
# Everything a model's behaviour depends on: the kernels, the model layer, and the
# services that fit it and run it per frame.
_TRAINING_PACKAGES = ("kernels", "model")
_TRAINING_MODULES = ("service/pipeline.py", "service/training.py")


class DemoError(LhtstreamError):
    """The demo could not prepare its data or its processes failed."""


def default_cache() -> Path:
    """``$XDG_CACHE_HOME/lhtstream/demo`` or ``~/.cache/lhtstream/demo``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lhtstream" / "demo"


@dataclass(frozen=True)
class Prepared:
    train: Path
    live: Path
    model: Path
    reused: bool
    seconds: float


def _sources_digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.name.encode())
        with contextlib.suppress(OSError):
            h.update(f.read_bytes())
    return h.hexdigest()


def _constants_digest(*modules: Any) -> str:
    """Digest of the modules' public UPPER_CASE constants as they are now (catches a
    parameter overridden at run time, which a digest of the source would miss)."""
    values = {}
    for mod in modules:
        for name in sorted(vars(mod)):
            if name.isupper() and not name.startswith("_"):
                values[f"{mod.__name__}.{name}"] = repr(getattr(mod, name))
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def cache_keys() -> dict[str, str]:
    """``{"data": ..., "model": ...}`` hex digests the cached data and model are valid for.

    data: demo `SETTINGS`, lhtstream version, the simulator's source files and the
    current values of its parameters (``lhtstream.io.simulate.params``, ``.anomalies``).
    model: the data key plus the source of the feature, model, detector and pipeline
    modules (a retrain is cheap; training on stale code is silently wrong).
    """


    package = Path(lhtstream.__file__).parent
    data = hashlib.sha256(json.dumps({
        "settings": SETTINGS,
        "lhtstream": lhtstream.__version__,
        "simulator_sources": _sources_digest(list((package / "io" / "simulate").glob("*.py"))),
        "simulator_params": _constants_digest(params, anomalies),
    }, sort_keys=True).encode()).hexdigest()
    training = sorted(
        [p for layer in _TRAINING_PACKAGES for p in (package / layer).rglob("*.py")]
        + [package / m for m in _TRAINING_MODULES]
    )
    model = hashlib.sha256((data + _sources_digest(training)).encode()).hexdigest()
    return {"data": data, "model": model}


def prepare(cache: Path, quiet: bool = False) -> Prepared:
    """Synthesise the demo data and train its model into ``cache`` unless still valid there.

    The stamp ``demo-cache.json`` records the `cache_keys` the data and the model were
    made for. Stale data (settings, version or simulator changed) is re-synthesised and
    the model retrained; a stale model, or one that no longer loads (e.g. an older
    model format), is retrained on the cached data.
    """

    cache = Path(cache)
    train, live, model = cache / "train", cache / "live", cache / "model.npz"
    stamp = cache / "demo-cache.json"
    t0 = time.monotonic()
    keys = cache_keys()
    old: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads(stamp.read_text())
        old = loaded if isinstance(loaded, dict) else {}
    data_ok = old.get("data") == keys["data"] and train.is_dir() and live.is_dir()
    model_ok = data_ok and old.get("model") == keys["model"] and _loads(model)
    if model_ok:
        return Prepared(train, live, model, True, time.monotonic() - t0)

    def say(text: str) -> None:
        if not quiet:
            print(f"demo: {text}", file=sys.stderr, flush=True)

    s = SETTINGS
    cache.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)  # an interrupted rebuild leaves no valid stamp
    (cache / "demo-settings.json").unlink(missing_ok=True)  # the stamp of older versions
    if not data_ok:
        for folder in (train, live):
            shutil.rmtree(folder, ignore_errors=True)
        say(f"synthesising the demo data set into {cache}"
            + (" (simulator, settings or version changed)" if old else " (first run only)"))
        synthesize(train, types=s["types"], videos_per_type=s["train_videos_per_type"],
                   frames=s["train_frames"], seed=s["train_seed"])
        synthesize(live, types=s["types"], videos_per_type=s["live_videos_per_type"],
                   frames=s["live_frames"], anomaly_rate=s["live_anomaly_rate"],
                   anomalies=s["live_anomalies"], seed=s["live_seed"])
    say("training the normality model on the normal videos"
        + ("" if not data_ok else " (the cached model is stale or does not load)"))
    fitted = fit_dataset(train)
    tmp = cache / "model.part.npz"
    fitted.save(tmp)
    os.replace(tmp, model)
    stamp.write_text(json.dumps({**keys, "settings": SETTINGS}, indent=1))
    return Prepared(train, live, model, False, time.monotonic() - t0)


def _loads(model: Path) -> bool:
    """True when the cached model loads with this version of lhtstream (else retrain)."""

    try:
        NormalityModel.load(model)
    except Exception:
        return False
    return True


# ---------------------------------------------------------------- summary


def _match(labels: dict, alarms: list[dict], verdicts: list[dict]) -> list[dict[str, Any]]:
    """One row per video: the injected fault against the alarms raised on it.

    A fault is *detected* by the first raise of its expected kind
    (`detector.ALARM_KIND_FOR_ANOMALY`) at or after its onset; the delay is in
    frames. *False alarms* are raises on a normal video, and raises before the
    onset in a faulty one. Raises of other kinds after the onset are listed as
    ``other`` (a fault often disturbs more than one feature). Frames are the
    video's frame indices.
    """

    by_video: dict[tuple[int, str], list[dict]] = {}
    for a in alarms:
        by_video.setdefault((a["type"], a["video"]), []).append(a)
    verdict = {(v["type"], v["video"]): v for v in verdicts}
    rows = []
    for key in sorted(labels):
        label = labels[key]
        events = sorted(by_video.get(key, []), key=lambda a: a["frame"])
        raised = [a for a in events if a.get("state") == "raise"]
        normal = label.kind == "normal"
        onset = None if normal else label.onset_frame
        expected = None if normal else ALARM_KIND_FOR_ANOMALY.get(label.kind)
        false, other, hit = [], [], None
        for a in raised:
            if onset is None or a["frame"] < onset:
                false.append(a)
            elif hit is None and a["kind"] == expected:
                hit = a
            else:
                other.append(a)
        # an alarm of the expected kind raised early and still active at the onset
        # covers the fault, but it is a false alarm, not a detection
        active_at_onset = None
        if onset is not None and hit is None:
            for a in events:
                if a["kind"] != expected or a["frame"] >= onset:
                    continue
                active_at_onset = a if a["state"] == "raise" else None
        v = verdict.get(key)
        rows.append({
            "type": key[0], "video": key[1], "fault": label.kind, "onset": onset,
            "expected_kind": expected,
            "detected_kind": None if hit is None else hit["kind"],
            "delay_frames": None if hit is None else hit["frame"] - onset,
            "active_at_onset_frame": None if active_at_onset is None
            else active_at_onset["frame"],
            "false_alarms": [(a["kind"], a["frame"], round(float(a["score"]), 3))
                             for a in false],
            "other_alarms": [(a["kind"], a["frame"] - onset) for a in other],
            "verdict": None if v is None else ("ANOMALOUS" if v["anomalous"] else "normal"),
        })
    return rows


def format_summary(rows: list[dict], latency: dict, frames: int, lost: int,
                   partial: bool = False) -> str:
    """The end-of-demo table: per video the fault, its alarm and delay, false alarms."""
    head = (f"{'video':<12} {'injected fault (onset frame)':<30} {'alarm of the expected kind':<30}"
            f" {'false alarms (kind@frame)':<30} verdict")
    lines = ["", "partial summary (interrupted): the videos streamed so far" if partial else "",
             head]
    for r in rows:
        name = f"Type{r['type']}/{r['video']}"
        if r["fault"] == "normal":
            fault, got = "none", "-"
        else:
            fault = f"{r['fault']} ({r['onset']})"
            if r["detected_kind"] is not None:
                got = f"{r['detected_kind']} after {r['delay_frames']} frames"
            elif r["active_at_onset_frame"] is not None:
                got = f"{r['expected_kind']} active since {r['active_at_onset_frame']}"
            else:
                got = f"MISSED ({r['expected_kind']})"
        fa = ", ".join(f"{k}@{f}" for k, f, _ in r["false_alarms"]) or "none"
        lines.append(f"{name:<12} {fault:<30} {got:<30} {fa:<30} {r['verdict'] or '-'}")
        if r["other_alarms"]:
            kinds: dict[str, list[int]] = {}
            for k, d in r["other_alarms"]:
                kinds.setdefault(k, []).append(d)
            lines.append(f"{'':<12} also raised after the onset: " + ", ".join(
                f"{k} +{d[0]}" + (f" (x{len(d)})" if len(d) > 1 else "")
                for k, d in kinds.items()))
    faults = [r for r in rows if r["fault"] != "normal"]
    found = [r for r in faults if r["detected_kind"] is not None]
    on_normal = sum(len(r["false_alarms"]) for r in rows if r["fault"] == "normal")
    before = sum(len(r["false_alarms"]) for r in faults)
    delays = sorted(r["delay_frames"] for r in found)
    lines.append(
        f"\ninjected faults: {len(faults)}, alarmed with the expected kind: {len(found)}"
        + (f" (delay {delays[0]}..{delays[-1]} frames)" if delays else "")
        + f"; false alarms: {on_normal + before} ({on_normal} on normal videos, "
        f"{before} before a fault's onset)")
    lat = latency
    lines.append(f"frames handled: {frames:,}, lost: {lost}; per-frame handling latency (us): "
                 f"p50 {lat.get('p50')}  p99 {lat.get('p99')}  p99.9 {lat.get('p999')}  "
                 f"max {lat.get('max')}")
    return "\n".join(line for i, line in enumerate(lines) if line or i == 0)


# ---------------------------------------------------------------- run


VIEW_PORT = 8050
"""The demo's live view listens here (another free port when this one is taken)."""


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _start_view(publish_ep: str, frames_ep: str, model: Path, journal: Path,
                port: int) -> Child | None:
    """`lhtstream view` on the demo's monitor and frames; prints its address. None (and
    the demo goes on without it) when it cannot start."""
    if port and not _port_free(port):
        print(f"demo: port {port} is taken; the live view takes a free one", flush=True)
        port = 0
    view = Child(["-m", "lhtstream.cli", "view", "--monitor", publish_ep, "--frames",
                  frames_ep, "--model", str(model), "--journal", str(journal),
                  "--port", str(port)], "view")
    try:
        match = view.wait_for(r"serving (http://\S+/)", 60)
    except LhtstreamError as exc:
        view.stop(timeout=5.0)
        print(f"demo: the live view did not start, going on without it: "
              f"{str(exc).splitlines()[0]}", flush=True)
        return None
    print(f"demo: live view at {match.group(1)} (open it in a browser while the demo runs; "
          f"Prometheus metrics at {match.group(1)}metrics)", flush=True)
    return view


def run_demo(args: Any) -> int:
    """CLI handler for ``lhtstream demo [--cache DIR] [--seconds S]``.

    Returns 0 after a full run. Ctrl-C (SIGINT) stops the replay, then the
    monitor, removes the temp folder with the ipc sockets, prints a partial
    summary and returns `INTERRUPTED_EXIT` (130).
    """


    t_start = time.monotonic()
    cache = Path(args.cache) if getattr(args, "cache", None) else default_cache()
    seconds = getattr(args, "seconds", None)
    prepared = prepare(cache)
    print(f"demo: data and model {'reused from' if prepared.reused else 'written to'} {cache} "
          f"({prepared.seconds:.1f} s)", flush=True)
    labels = read_labels(prepared.live)

    folder = short_tempdir("lht-demo-")
    frames_ep, publish_ep = f"ipc://{folder}/frames", f"ipc://{folder}/out"
    latency_log = folder / "latency.npy"
    replay_summary = folder / "replay.json"
    children: list[Child] = []
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    for topic in (b"alarm", b"verdict", b"status"):
        sub.setsockopt(zmq.SUBSCRIBE, topic)
    tty = sys.stdout.isatty()
    alarms: list[dict] = []
    verdicts: list[dict] = []
    status: dict = {}  # the whole monitor's latest
    stream_status: dict = {}  # stream -> its latest status
    interrupted = False
    streaming = False
    codes: dict[str, int | None] = {}
    try:
        monitor = Child(monitor_args(frames_ep, publish_ep, prepared.model,
                                     folder / "journal.sqlite", latency_log, 0.5), "monitor")
        children.append(monitor)
        print(f"demo: monitor pid {monitor.pid} starting (compiles its kernels on first use)",
              flush=True)
        monitor.wait_for(r"monitor: ready in", 300)
        sub.connect(publish_ep)
        view = _start_view(publish_ep, frames_ep, prepared.model, folder / "journal.sqlite",
                           getattr(args, "view_port", VIEW_PORT))
        if view is not None:
            children.append(view)
        # frame subscribers to wait for: the monitor, and the view's pictures
        subscribers = "2" if view is not None else "1"
        replay = Child(["-m", "lhtstream.cli", "replay", str(prepared.live), "--endpoint",
                        frames_ep, "--rate", "1000", "--wait-subscribers", subscribers,
                        "--summary-json", str(replay_summary)], "replay")
        children.append(replay)
        n_videos = len(labels)
        print(f"demo: replay pid {replay.pid} streaming {n_videos} videos at 1000 frames/s "
              f"over {frames_ep}", flush=True)
        # --seconds: stop the replay once that much footage has streamed, counted from the
        # first status with frames (start-up time of replay and view does not count)
        deadline: float | None = None
        last_line = 0.0
        replay_done_at: float | None = None
        replay_sent: int | None = None
        while True:
            if sub.poll(100):
                while True:
                    try:
                        parts = sub.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    header = msgpack.unpackb(parts[1], raw=False)
                    topic = parts[0].split(b"/", 1)[0]  # b"alarm/ws1/" -> b"alarm"
                    if topic == b"alarm":
                        alarms.append(header)
                        if tty:
                            print("\r\033[K", end="")
                        print(f"ALARM {header['state']:<5} {header['kind']:<15} "
                              f"Type{header['type']}/{header['video']} frame {header['frame']} "
                              f"score {header['score']:.3g} (threshold "
                              f"{header['threshold']:.3g})", flush=True)
                    elif topic == b"verdict":
                        verdicts.append(header)
                    elif topic == b"status" and header.get("stream") != "*":
                        stream_status[header.get("stream")] = header
                    elif topic == b"status":
                        status = header
                        if not streaming and status.get("frames", 0) > 0:
                            streaming = True
                            if seconds:
                                deadline = (time.monotonic() + float(seconds)
                                            - status["frames"] / 1000.0)
                            if tty:
                                print("\r\033[K", end="")
                            print("demo: frames are flowing through the monitor "
                                  "(Ctrl-C stops cleanly)", flush=True)
            now = time.monotonic()
            if tty and now - last_line > 0.25:
                last_line = now
                p99 = (status.get("latency_us") or {}).get("p99")
                raised = sum(1 for a in alarms if a["state"] == "raise")
                print(f"\r\033[Kframes {status.get('frames', 0):>6}  latency p99 "
                      f"{p99 if p99 is not None else '-'} us  alarms {raised}  "
                      f"verdicts {len(verdicts)}/{n_videos}", end="", flush=True)
            if deadline is not None and now > deadline and replay.popen.poll() is None:
                replay.stop()
            if replay.popen.poll() is not None:
                replay_done_at = replay_done_at or now
                if replay_sent is None:
                    with contextlib.suppress(LhtstreamError):
                        replay_sent = read_replay_summary(replay_summary)["frames_sent"]
                # done when every verdict came, or (--seconds: the last video gets
                # none) every frame sent was handled and a status interval passed
                handled = status.get("frames", 0) + status.get("dropped", 0)
                if (len(verdicts) >= n_videos or now - replay_done_at > 5.0
                        or (replay_sent is not None and handled >= replay_sent
                            and now - replay_done_at > 0.6)):
                    break
            if monitor.popen.poll() is not None:
                raise DemoError(f"the monitor exited early:\n{monitor.text()[-2000:]}")
        if tty:
            print("\r\033[K", end="")
    except KeyboardInterrupt:
        interrupted = True
        if tty:
            print("\r\033[K", end="")
        print("demo: interrupted; stopping the replay and the monitor", file=sys.stderr,
              flush=True)
    finally:
        # A second Ctrl-C must not abandon the children half-stopped: ignore SIGINT
        # while stopping them (each stop is bounded: SIGTERM, then SIGKILL after 5 s).
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for c in reversed(children):  # replay first, then the monitor
                codes[c.name] = c.stop(timeout=5.0)
            sub.close(0)
            ctx.term()
        finally:
            signal.signal(signal.SIGINT, previous)
    try:
        sent = 0
        with contextlib.suppress(LhtstreamError):  # a replay stopped before it began
            sent = read_replay_summary(replay_summary)["frames_sent"]
        lat = (np.load(latency_log, allow_pickle=False) if latency_log.exists()
               else np.zeros(0))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if not interrupted and any(code != 0 for code in codes.values()):
        raise DemoError(f"child process failed (exit codes {codes}):\n"
                        + "\n".join(c.text()[-1500:] for c in children))
    # With --seconds or after Ctrl-C only the videos that were (partly) streamed
    # are summarised.
    seen = {(v["type"], v["video"]) for v in verdicts} | {(a["type"], a["video"]) for a in alarms}
    for st in stream_status.values():
        if st.get("video") is not None:
            seen.add((st.get("type"), st.get("video")))
    shown = {k: v for k, v in labels.items() if k in seen} if (seconds or interrupted) else labels
    rows = _match(shown, alarms, verdicts)
    print(format_summary(rows, percentiles(lat, LAT_QS), int(lat.size),
                         max(sent - int(lat.size), 0), partial=interrupted))
    ended = "interrupted after" if interrupted else "done in"
    print(f"demo: {ended} {time.monotonic() - t_start:.1f} s; replay and monitor stopped "
          f"(exit codes {codes.get('replay')}, {codes.get('monitor')})", flush=True)
    return INTERRUPTED_EXIT if interrupted else 0
