"""Every subcommand's handler: parse what the user typed, call the library, print.

`lhtstream.cli.parser` builds the parser and imports this module only once a
subcommand runs (it imports numba: ~0.5 s that `--help` should not pay).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from lhtstream.base.selection import parse_names, parse_types
from lhtstream.cli.bench import run_bench
from lhtstream.cli.demo import run_demo
from lhtstream.cli.plots import require_matplotlib, write_plots
from lhtstream.cli.subscribers import run_alarms, run_tap
from lhtstream.io.curve import Curve, make_keys
from lhtstream.io.dataset import validate
from lhtstream.io.perturb import PERTURBATIONS, PerturbError, perturb_dataset
from lhtstream.io.protocol import DEFAULT_FRAME_ENDPOINT, DEFAULT_PUBLISH_ENDPOINT
from lhtstream.io.simulate import synthesize
from lhtstream.model.kdeamd import NOISE_VARIANCE
from lhtstream.model.normality import GROUPS, NormalityModel
from lhtstream.service.evaluate import evaluate
from lhtstream.service.kdeamd_protocol import ProtocolError, noise_levels
from lhtstream.service.monitor import serve
from lhtstream.service.replay import Interrupted, ReplayError, interrupt_load, replay
from lhtstream.service.training import fit_dataset


def cmd_synth(args: argparse.Namespace) -> int:
    summary = synthesize(
        args.out,
        types=parse_types(args.types),
        videos_per_type=args.videos_per_type,
        frames=args.frames,
        anomaly_rate=args.anomaly_rate,
        anomalies=parse_names(args.anomalies),
        seed=args.seed,
        full=args.full,
        progress=sys.stderr.isatty(),
        ramp_frames=args.ramp_frames,
    )
    print(summary)
    return 0


def cmd_perturb(args: argparse.Namespace) -> int:
    if args.list:
        for p in PERTURBATIONS.values():
            print(f"{p.name:<18} {p.family:<12} {p.magnitude:g}: {p.meaning}")
        return 0
    if not args.src or not args.out:
        raise PerturbError("perturb needs SRC and OUT (or --list)")
    progress = Progress()
    summary = perturb_dataset(args.src, args.out, kinds=parse_names(args.kinds),
                              types=parse_types(args.types), videos=parse_names(args.videos),
                              seed=args.seed, scale=args.scale, progress=progress)
    progress.done("perturb: done")
    print(summary)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    problems = validate(args.data)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s) in {args.data}", file=sys.stderr)
        return 1
    print(f"{args.data}: OK")
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    """``lhtstream monitor``; returns 0 after SIGINT/SIGTERM."""
    return serve(
        frames=args.frames or [DEFAULT_FRAME_ENDPOINT],
        publish=args.publish,
        model=args.model,
        journal=args.journal,
        status_interval=args.status_interval,
        calibration_seconds=args.calibration_seconds,
        streams=args.streams,
        max_streams=args.max_streams,
        idle_seconds=args.idle_seconds,
        latency_log=args.latency_log,
        curve=Curve.from_files(args.curve_secret, args.curve_server_key, args.curve_clients),
    )


def cmd_view(args: argparse.Namespace) -> int:
    """``lhtstream view``; returns 0 after SIGINT/SIGTERM."""
    from lhtstream.service import view  # local import: start-up time (aiohttp, ~0.2 s)

    view.serve(args.monitor or [DEFAULT_PUBLISH_ENDPOINT], args.frames or [], args.host,
               args.port, allow_hosts=args.allow_host or [], model_path=args.model,
               journal=args.journal)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """``lhtstream keys DIR --name NAME``: a CURVE key pair for one process."""
    public, secret = make_keys(args.folder, args.name)
    print(f"public key: {public}  (give it to the peers: --curve-server-key, or copy it "
          "into their --curve-clients folder)")
    print(f"secret key: {secret}  (this process's --curve-secret; keep it private)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    return run_bench(args)


def cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(args)


def cmd_tap(args: argparse.Namespace) -> int:
    return run_tap(args)


def cmd_alarms(args: argparse.Namespace) -> int:
    return run_alarms(args)


def cmd_replay(args: argparse.Namespace) -> int:
    """``lhtstream replay``; SIGINT/SIGTERM stop cleanly with exit 0."""
    if str(args.rate).strip().lower() == "max":
        rate = None
    else:
        try:
            rate = float(args.rate)
        except ValueError:
            raise ReplayError(f"bad --rate {args.rate!r}: frames/s or 'max'") from None
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()
        interrupt_load(signal.Signals(signum).name)  # raises while a load is awaited

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        stats = replay(
            args.data, args.endpoint, rate=rate, loop=args.loop, types=parse_types(args.types),
            videos=parse_names(args.videos), streams=args.streams,
            wait_subscribers=args.wait_subscribers, stream_prefix=args.stream_prefix,
            stop=stop,
            curve=Curve.from_files(args.curve_secret, None, args.curve_clients),
        )
    except Interrupted as exc:
        print(f"{exc}; exiting without waiting for it", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(0)  # the load's thread may stay blocked (a FIFO, a stalled mount)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    print(stats.summary(), file=sys.stderr)
    print(stats.jitter_line(), file=sys.stderr, flush=True)
    if args.summary_json:
        stats.write_json(args.summary_json)
    return 0


def model_summary(model: NormalityModel) -> str:
    """Readable account of what a model learned."""
    tr, cal = model.training, model.calibration
    lines = [
        f"types: {','.join(str(t) for t in model.types.tolist())}",
        f"training: {tr.get('videos', '?')} videos, {tr.get('frames', '?')} frames; "
        f"held out: {tr.get('heldout_videos', '?')} videos, {tr.get('heldout_frames', '?')} frames",
        f"phase bins: {model.phase_bins}; judged cells: "
        f"{int(model.valid.sum())}/{model.valid.size}",
    ]
    if cal:
        thr = cal.get("raise", {})
        lines.append("thresholds (smoothed score): "
                     + ", ".join(f"{g}={thr.get(g, float('nan')):.3g}" for g in GROUPS))
        lines.append(f"video score threshold: {cal.get('video', float('nan')):.4g}")
        lines.append(f"held-out false alarms: {cal.get('heldout_alarms', '?')} in "
                     f"{cal.get('heldout_hours', 0.0) * 3600:.1f} s of footage")
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace) -> int:
    """`lhtstream train DATA [--types ...] -o MODEL`."""
    def progress(msg: str) -> None:
        print(f"train: {msg}", file=sys.stderr, flush=True)

    model = fit_dataset(args.data, types=parse_types(args.types), progress=progress,
                        workers=args.workers)
    out = model.save(args.output)
    print(model_summary(model))
    print(f"model written to {out}")
    return 0


class Progress:
    """One status line on stderr: rewritten in place on a tty, else at most every few s."""

    def __init__(self, stream: Any = None, interval: float = 5.0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval
        self._last = -math.inf
        self._width = 0

    def __call__(self, message: str) -> None:
        if self.tty:
            pad = max(self._width - len(message), 0)
            self.stream.write("\r" + message + " " * pad)
            self._width = len(message)
            self.stream.flush()
            return
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            print(message, file=self.stream, flush=True)

    def done(self, message: str) -> None:
        """A line that stays (end of a stage)."""
        if self.tty:
            self(message)
            self.stream.write("\n")
            self._width = 0
            self.stream.flush()
        else:
            print(message, file=self.stream, flush=True)
            self._last = time.monotonic()


def _f(v: Any, fmt: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, fmt)


def format_report(report: dict[str, Any]) -> str:
    """The report as a readable text table."""
    lines = [
        f"videos: {report['videos']} ({report['normal_videos']} normal, "
        f"{report['anomalous_videos']} anomalous)",
        f"auc_videos (verdict score, normal vs anomalous): {_f(report['auc_videos'])}",
    ]
    unseen = {kind: k for kind, k in report["per_kind"].items() if k["family"] != "simulator"}
    simulated = {kind: k for kind, k in report["per_kind"].items() if kind not in unseen}
    if simulated:
        lines += ["", f"{'anomaly kind':<28}{'videos':>7}{'expected':>16}{'detected':>10}"
                      f"{'any kind':>10}{'delay med':>11}{'delay p95':>11}{'auc':>7}"]
    for kind, k in simulated.items():
        lines.append(
            f"{kind:<28}{k['videos']:>7}{k['expected_alarm_kind'] or '-':>16}"
            f"{_f(k['detected_fraction'], '.2f'):>10}"
            f"{_f(k['detected_any_kind_fraction'], '.2f'):>10}"
            f"{_f(k['delay_frames_median'], '.0f'):>11}{_f(k['delay_frames_p95'], '.0f'):>11}"
            f"{_f(k['auc_vs_normal'], '.3f'):>7}")
    ramped = {kind: k for kind, k in report["per_kind"].items() if "ramp_frames" in k}
    if ramped:
        lines += ["", f"{'ramped fault':<28}{'ramp':>7}{'alarmed before ramp end':>25}"
                      f"{'delay med':>11}"]
        for kind, k in ramped.items():
            lines.append(f"{kind:<28}{k['ramp_frames']:>7}"
                         f"{_f(k['alarmed_before_ramp_end_fraction'], '.2f'):>25}"
                         f"{_f(k['delay_before_ramp_end_median'], '.0f'):>11}")
    if unseen:
        paired = all("quiet_source_videos" in k for k in unseen.values())
        lines += ["", "unseen faults (frame perturbations, `lhtstream perturb`; alarmed = an alarm "
                      "of any kind raised in [onset, end + 100]"
                  + ("; counted on copies whose normal source raised nothing there; 'from "
                     "change': median delay from the first frame the perturbation changed"
                     if paired else "") + "):",
                  f"{'perturbation':<20}{'family':<13}{'videos':>7}{'types':>6}{'alarmed':>9}"
                  f"{'delay med':>11}{'delay p95':>11}{'from change':>13}{'auc':>7}"
                  "  kinds raised"]
        for kind, k in unseen.items():
            n, frac, med, p95 = ((k["quiet_source_videos"], k["alarmed_quiet_source_fraction"],
                                  k["delay_quiet_source_median"], k["delay_quiet_source_p95"])
                                 if paired else
                                 (k["videos"], k["detected_any_kind_fraction"],
                                  k["delay_any_kind_median"], k["delay_any_kind_p95"]))
            lines.append(
                f"{kind:<20}{k['family']:<13}{n:>7}{k['types']:>6}{_f(frac, '.2f'):>9}"
                f"{_f(med, '.0f'):>11}{_f(p95, '.0f'):>11}"
                f"{_f(k.get('delay_first_change_median'), '.0f'):>13}"
                f"{_f(k['auc_vs_normal'], '.3f'):>7}  " + ",".join(k["alarm_kinds_in_window"]))
    lines += [
        "",
        f"false alarms on normal videos: {report['false_alarms']} in "
        f"{report['footage_hours'] * 3600:.0f} s of footage = "
        f"{_f(report['false_alarms_per_hour'], '.2f')} /hour "
        f"(95% upper bound {_f(report['false_alarms_per_hour_upper95'], '.1f')} /hour)"
        + (f"; by kind {report['false_alarms_by_kind']}" if report["false_alarms_by_kind"]
           else ""),
    ]
    mf = report.get("monitor_frame_us")
    if mf:
        lines.append(f"monitor path per frame (features + model + detector, in blocks), over "
                     f"videos: median {mf['median']:.2f} µs, p99 {mf['p99']:.2f} µs")
    kp = report.get("kdeamd_protocol")
    if kp and "auc" in kp:
        lines += ["", *format_protocol(kp)]
    elif kp:
        lines.append(f"KDE-AMD protocol skipped: {kp.get('skipped')}")
    lines.append(f"\nwall time: {report['seconds']:.1f} s")
    return "\n".join(lines)


def format_protocol(kp: dict[str, Any]) -> list[str]:
    """The KDE-AMD protocol's pooled AUC per method and noise variance, and per-frame cost."""
    rows = kp.get("levels") or [{"noise_variance_px2": kp["noise_variance_px2"],
                                 "auc": kp["auc"], "auc_baseline": kp.get("auc_baseline")}]
    methods = [("lhtstream (ours)", "", kp.get("cost_us"))]
    if kp.get("auc_baseline") is not None:
        g = kp["baseline"]
        methods.append((f"KDE-AMD as published {g['rows']}x{g['cols']} l={g['lambda']}",
                        "_baseline", kp.get("cost_us_baseline")))
    if kp.get("auc_baseline_paper") is not None:
        g = kp["baseline_paper"]
        methods.append((f"KDE-AMD paper {g['rows']}x{g['cols']} l={g['lambda']}",
                        "_baseline_paper", kp.get("cost_us_baseline_paper")))
    lines = [f"KDE-AMD protocol ({kp['videos']} normal videos, {kp['types']} types, "
             f"{kp['folds']}): pooled AUC per noise variance (px^2)",
             f"  {'method':<34}" + "".join(f"{r['noise_variance_px2']:>9g}" for r in rows)
             + f"{'µs/frame':>10}"]
    for name, key, cost in methods:
        lines.append(f"  {name:<34}" + "".join(f"{_f(r.get('auc' + key)):>9}" for r in rows)
                     + f"{_f(cost, '.1f'):>10}")
    return lines


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def parse_variances(text: str | None) -> tuple[float, ...]:
    """``--protocol-noise 0.02,0.01`` as checked variances (px^2); None: the published 0.02."""
    if text is None:
        return (NOISE_VARIANCE,)
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise ProtocolError(f"--protocol-noise {text!r}: give variances in px^2, e.g. "
                            f"0.02,0.01,0.005,0.0025") from None
    return noise_levels(values)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """`lhtstream evaluate DATA --model MODEL [--types] [--json FILE] [--plots DIR]
    [--no-baseline]`."""
    plots = getattr(args, "plots", None)
    if plots:
        require_matplotlib()
    variances = parse_variances(args.protocol_noise)
    progress = Progress()
    report = evaluate(args.data, args.model, types=parse_types(args.types),
                      baseline=not args.no_baseline, timelines=bool(plots), progress=progress,
                      noise_variances=variances, workers=args.workers)
    progress.done("evaluate: done")
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(_jsonable(report), indent=1))
        print(f"report written to {args.json}")
    if plots:
        written = write_plots(report, report.get("_results", []), plots)
        print(f"{len(written)} plot(s) written to {plots}")
    return 0

