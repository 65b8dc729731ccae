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
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lhtstream.errors import LhtstreamError

# The demo set. Changing any of these invalidates the cache (the settings are
# stored next to the data and compared on the next run).
SETTINGS: dict[str, Any] = {
    "version": 1,
    "types": [1, 20],              # no obstacle / one obstacle window
    "train_videos_per_type": 4,
    "train_frames": 3000,
    "live_videos_per_type": 3,
    "live_frames": 3000,
    "live_anomaly_rate": 0.67,     # 2 of 3 live videos per type carry a fault
    "live_anomalies": ["power_drop", "scanner_stall", "camera_dropout", "spot_defocus"],
    "train_seed": 101,
    "live_seed": 202,
}


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


def prepare(cache: Path, quiet: bool = False) -> Prepared:
    """Synthesise the demo data and train its model into ``cache`` unless already there."""
    from lhtstream.model import fit_dataset
    from lhtstream.simulate import synthesize

    cache = Path(cache)
    train, live, model = cache / "train", cache / "live", cache / "model.npz"
    stamp = cache / "demo-settings.json"
    t0 = time.monotonic()
    with contextlib.suppress(OSError, ValueError):
        if json.loads(stamp.read_text()) == SETTINGS and _loads(model):
            return Prepared(train, live, model, True, time.monotonic() - t0)

    def say(text: str) -> None:
        if not quiet:
            print(f"demo: {text}", file=sys.stderr, flush=True)

    s = SETTINGS
    cache.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    for folder in (train, live):
        shutil.rmtree(folder, ignore_errors=True)
    say(f"synthesising the demo data set into {cache} (first run only)")
    synthesize(train, types=s["types"], videos_per_type=s["train_videos_per_type"],
               frames=s["train_frames"], seed=s["train_seed"])
    synthesize(live, types=s["types"], videos_per_type=s["live_videos_per_type"],
               frames=s["live_frames"], anomaly_rate=s["live_anomaly_rate"],
               anomalies=s["live_anomalies"], seed=s["live_seed"])
    say("training the normality model on the normal videos")
    fitted = fit_dataset(train)
    tmp = cache / "model.part.npz"
    fitted.save(tmp)
    os.replace(tmp, model)
    stamp.write_text(json.dumps(SETTINGS, indent=1))
    return Prepared(train, live, model, False, time.monotonic() - t0)


def _loads(model: Path) -> bool:
    """True when the cached model loads with this version of lhtstream (else retrain)."""
    from lhtstream.model import NormalityModel

    try:
        NormalityModel.load(model)
    except Exception:
        return False
    return True


# ---------------------------------------------------------------- summary


def _match(labels: dict, alarms: list[dict], verdicts: list[dict]) -> list[dict[str, Any]]:
    """One row per live video: the injected fault, the first alarm raised at/after it, verdict."""
    from lhtstream.detector import ALARM_KIND_FOR_ANOMALY

    by_video: dict[tuple[int, str], list[dict]] = {}
    for a in alarms:
        if a.get("state") == "raise":
            by_video.setdefault((a["type"], a["video"]), []).append(a)
    verdict = {(v["type"], v["video"]): v for v in verdicts}
    rows = []
    for key in sorted(labels):
        label = labels[key]
        raised = sorted(by_video.get(key, []), key=lambda a: a["frame"])
        onset = label.onset_frame if label.kind != "normal" else None
        first = None
        if onset is not None:
            first = next((a for a in raised if a["frame"] >= onset), None)
        v = verdict.get(key)
        rows.append({
            "type": key[0], "video": key[1], "fault": label.kind, "onset": onset,
            "expected_kind": ALARM_KIND_FOR_ANOMALY.get(label.kind),
            "alarms": [(a["kind"], a["frame"]) for a in raised],
            "detected_kind": None if first is None else first["kind"],
            "delay_frames": None if first is None else first["frame"] - onset,
            "false_alarms_before_onset": sum(1 for a in raised
                                             if onset is None or a["frame"] < onset),
            "verdict": None if v is None else ("ANOMALOUS" if v["anomalous"] else "normal"),
        })
    return rows


def format_summary(rows: list[dict], latency: dict, frames: int, lost: int) -> str:
    lines = ["", "video        injected fault (onset)           first alarm after onset"
             "          verdict"]
    for r in rows:
        fault = "none" if r["fault"] == "normal" else f"{r['fault']} (frame {r['onset']})"
        if r["fault"] == "normal":
            got = ("no alarm" if not r["alarms"]
                   else f"{len(r['alarms'])} alarm(s): " + ", ".join(k for k, _ in r["alarms"]))
        elif r["detected_kind"] is None:
            got = "MISSED"
        else:
            got = f"{r['detected_kind']} after {r['delay_frames']} frames"
        lines.append(f"Type{r['type']}/{r['video']}  {fault:<33} {got:<32} {r['verdict'] or '-'}")
    faults = [r for r in rows if r["fault"] != "normal"]
    found = [r for r in faults if r["detected_kind"] is not None]
    false = sum(r["false_alarms_before_onset"] for r in rows)
    lines.append(f"\ninjected faults: {len(faults)}, alarmed: {len(found)}; "
                 f"alarms on normal footage: {false}")
    lat = latency
    lines.append(f"frames handled: {frames:,}, lost: {lost}; per-frame handling latency (us): "
                 f"p50 {lat.get('p50')}  p99 {lat.get('p99')}  p99.9 {lat.get('p999')}  "
                 f"max {lat.get('max')}")
    return "\n".join(lines)


# ---------------------------------------------------------------- run


def run_demo(args: Any) -> int:
    """CLI handler for ``lhtstream demo [--cache DIR] [--seconds S]``."""
    import msgpack
    import zmq

    from lhtstream.benchmark import (
        LAT_QS,
        Child,
        monitor_args,
        parse_replay,
        percentiles,
        short_tempdir,
    )
    from lhtstream.dataset import read_labels

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
    children: list[Child] = []
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    for topic in (b"alarm", b"verdict", b"status"):
        sub.setsockopt(zmq.SUBSCRIBE, topic)
    tty = sys.stdout.isatty()
    alarms: list[dict] = []
    verdicts: list[dict] = []
    status: dict = {}
    interrupted = False
    try:
        monitor = Child(monitor_args(frames_ep, publish_ep, prepared.model,
                                     folder / "journal.sqlite", latency_log, 0.5), "monitor")
        children.append(monitor)
        print(f"demo: monitor pid {monitor.pid} starting (compiles its kernels on first use)",
              flush=True)
        monitor.wait_for(r"monitor: ready in", 300)
        sub.connect(publish_ep)
        replay = Child(["-m", "lhtstream.cli", "replay", str(prepared.live), "--endpoint",
                        frames_ep, "--rate", "1000", "--wait-subscribers", "1"], "replay")
        children.append(replay)
        n_videos = len(labels)
        print(f"demo: replay pid {replay.pid} streaming {n_videos} videos at 1000 frames/s "
              f"over {frames_ep}", flush=True)
        # --seconds: stop the replay that long after it starts (it joins within ~1 s)
        deadline = None if not seconds else time.monotonic() + 1.0 + float(seconds)
        last_line = 0.0
        replay_done_at = None
        while True:
            if sub.poll(100):
                while True:
                    try:
                        parts = sub.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    header = msgpack.unpackb(parts[1], raw=False)
                    if parts[0] == b"alarm":
                        alarms.append(header)
                        if tty:
                            print("\r\033[K", end="")
                        print(f"ALARM {header['state']:<5} {header['kind']:<15} "
                              f"Type{header['type']}/{header['video']} frame {header['frame']} "
                              f"score {header['score']:.3g} (threshold "
                              f"{header['threshold']:.3g})", flush=True)
                    elif parts[0] == b"verdict":
                        verdicts.append(header)
                    elif parts[0] == b"status":
                        status = header
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
                if len(verdicts) >= n_videos or now - replay_done_at > 5.0:
                    break
            if monitor.popen.poll() is not None:
                raise DemoError(f"the monitor exited early:\n{monitor.text()[-2000:]}")
        if tty:
            print("\r\033[K", end="")
    except KeyboardInterrupt:
        interrupted = True
        print("\ndemo: interrupted; stopping the replay and the monitor", file=sys.stderr)
    finally:
        codes = {c.name: c.stop() for c in reversed(children)}  # replay first, then monitor
        sub.close(0)
        ctx.term()
    try:
        sent = parse_replay(children[1].text())[0] if len(children) > 1 else 0
        lat = (np.load(latency_log, allow_pickle=False) if latency_log.exists()
               else np.zeros(0))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if interrupted:
        print(f"demo: stopped (children exit codes {codes})", file=sys.stderr)
        return 130
    if any(code != 0 for code in codes.values()):
        raise DemoError(f"child process failed (exit codes {codes}):\n"
                        + "\n".join(c.text()[-1500:] for c in children))
    # With --seconds only the videos that were (partly) streamed are summarised.
    seen = {(v["type"], v["video"]) for v in verdicts} | {(a["type"], a["video"]) for a in alarms}
    for st in (status.get("streams") or {}).values():
        if st.get("video") is not None:
            seen.add((st.get("type"), st.get("video")))
    shown = {k: v for k, v in labels.items() if k in seen} if seconds else labels
    rows = _match(shown, alarms, verdicts)
    print(format_summary(rows, percentiles(lat, LAT_QS), int(lat.size),
                         max(sent - int(lat.size), 0)))
    print(f"demo: done in {time.monotonic() - t_start:.1f} s; replay and monitor stopped "
          f"(exit codes {codes['replay']}, {codes['monitor']})", flush=True)
    return 0
