#!/usr/bin/env python3
"""Calibrate the simulator against the published KDE-AMD difficulty (DESIGN section 5).

Runs the KDE-AMD protocol (leave-one-out within a type, normal videos vs the
same videos with N(0, 0.02 px^2) position noise) on normal videos and prints
per-type and pooled AUC. The target on the real data is a pooled AUC of 0.978
(per type 0.94-1.0): much higher means the simulator is too clean, much lower
too noisy.

    python tools/calibrate_simulator.py                    # synthesize 36 x 6 x 3000, run
    python tools/calibrate_simulator.py --data DIR         # an existing (real or synthetic) set
    python tools/calibrate_simulator.py --set SCANNER_JITTER_PX=0.08
    python tools/calibrate_simulator.py --sweep SCANNER_JITTER_PX=0.04,0.08,0.12

``--set`` / ``--sweep`` override constants of ``lhtstream.io.simulate.params`` in
this process only (every ``lhtstream.io.simulate`` module holding that name is
patched), so the simulator's files are never edited. ``--cost`` also times one
frame's KDE evaluation (``KdeAmd.score_move``) on a type's training set.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lhtstream.base.selection import SelectionError
from lhtstream.base.selection import parse_types as select_types
from lhtstream.model.kdeamd import KdeAmd, measure_frame_cost, spot_positions
from lhtstream.service.kdeamd_protocol import ProtocolVideo, kdeamd_factory, run_protocol


def parse_types(text: str) -> list[int]:
    """The CLI's type selection (``1,5,20-36``), as an argparse type."""
    try:
        return select_types(text)
    except SelectionError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_value(text: str):
    """A float, or a comma-free tuple ``a/b/c`` of floats (for per-workstation constants)."""
    if "/" in text:
        return tuple(float(v) for v in text.split("/"))
    return float(text)


def patch_simulator(overrides: dict[str, object]) -> dict[str, object]:
    """Set simulator constants in every loaded lhtstream.io.simulate module; return old values."""
    import importlib
    import pkgutil

    import lhtstream.io.simulate as sim
    from lhtstream.io.simulate import params

    mods = [params, sim]
    for info in pkgutil.iter_modules(sim.__path__):
        mods.append(importlib.import_module(f"lhtstream.io.simulate.{info.name}"))
    old: dict[str, object] = {}
    for name, value in overrides.items():
        if not hasattr(params, name):
            raise SystemExit(f"calibrate_simulator: lhtstream.io.simulate.params has no {name}")
        old[name] = getattr(params, name)
        for m in mods:
            if hasattr(m, name):
                setattr(m, name, value)
    return old


def load_videos(root: Path, types: list[int], videos: int | None) -> dict[int, list[ProtocolVideo]]:
    """Normal videos of a data set as protocol series (spot positions + obstacle states)."""
    from lhtstream.io.dataset import Dataset, read_labels

    labels = read_labels(root)
    out: dict[int, list[ProtocolVideo]] = {}
    for v in Dataset(root).videos(types=types):
        lab = labels.get((v.type, v.name))
        if lab is not None and lab.anomalous:
            continue
        if videos is not None and len(out.get(v.type, [])) >= videos:
            continue
        pos = spot_positions(v.load())
        out.setdefault(v.type, []).append(ProtocolVideo(v.type, v.name, pos, v.obstacle_states()))
    return out


def synthesize_set(root: Path, types: list[int], videos: int, frames: int, seed: int) -> None:
    from lhtstream.io.simulate import synthesize

    synthesize(root, types=types, videos_per_type=videos, frames=frames, anomaly_rate=0.0,
               seed=seed)


def run_once(args: argparse.Namespace, overrides: dict[str, object]) -> dict:
    old = patch_simulator(overrides) if overrides else {}
    try:
        t0 = time.perf_counter()
        if args.data:
            root = Path(args.data)
            tmp = None
        else:
            tmp = tempfile.TemporaryDirectory(prefix="lht-calib-")
            root = Path(tmp.name)
            synthesize_set(root, args.types, args.videos, args.frames, args.seed)
        t_synth = time.perf_counter() - t0
        vids = load_videos(root, args.types, args.videos)
        t_load = time.perf_counter() - t0 - t_synth
        params = dict(rows=args.grid, cols=args.grid, lam=args.lam)
        res = run_protocol(vids, kdeamd_factory(**params), seed=args.noise_seed,
                           progress=(lambda s: print("  " + s, flush=True)) if args.verbose
                           else None)[0.02]
        out = {
            "overrides": {k: v for k, v in overrides.items()},
            "auc": res.auc,
            "per_type": res.per_type,
            "per_type_min": min(res.per_type.values()) if res.per_type else float("nan"),
            "videos": len(res.clean),
            "frames": args.frames if not args.data else None,
            "seconds_synth": t_synth,
            "seconds_load": t_load,
            "seconds_protocol": res.seconds,
            "clean_mean": float(np.mean(list(res.clean.values()))),
            "noisy_mean": float(np.mean(list(res.noisy.values()))),
        }
        if args.cost:
            t = min(vids)
            train = vids[t][1:]
            model = KdeAmd(**params).fit([v.positions for v in train],
                                         [v.obstacles for v in train])
            out["cost"] = measure_frame_cost(model, vids[t][0].positions, vids[t][0].obstacles)
            out["cost"]["type"] = t
        if tmp is not None:
            tmp.cleanup()
        return out
    finally:
        if old:
            patch_simulator(old)


def report(r: dict) -> None:
    tag = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "simulator defaults"
    print(f"== {tag}")
    per = r["per_type"]
    for t in sorted(per):
        print(f"  Type{t:<3d} auc {per[t]:.3f}")
    print(f"  pooled auc {r['auc']:.4f} (target 0.978), per-type min {r['per_type_min']:.3f}, "
          f"{r['videos']} videos, mean KL clean {r['clean_mean']:.4f} noisy {r['noisy_mean']:.4f}")
    print(f"  time: synthesize {r['seconds_synth']:.1f} s, positions {r['seconds_load']:.1f} s, "
          f"protocol {r['seconds_protocol']:.1f} s")
    if "cost" in r:
        c = r["cost"]
        print(f"  per-frame KDE evaluation (Type{c['type']}): median {c['median_us']:.1f} us, "
              f"p99 {c['p99_us']:.1f} us over {int(c['frames'])} frames, "
              f"median {c['points_median']:.0f} training points per evaluation")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="existing data set root (default: synthesize a fresh one)")
    ap.add_argument("--types", type=parse_types, default=list(range(1, 37)))
    ap.add_argument("--videos", type=int, default=6, help="normal videos per type")
    ap.add_argument("--frames", type=int, default=3000, help="frames per synthesized video")
    ap.add_argument("--seed", type=int, default=0, help="simulator seed")
    ap.add_argument("--noise-seed", type=int, default=0, help="protocol noise seed")
    ap.add_argument("--grid", type=int, default=35, help="R = C cells")
    ap.add_argument("--lam", type=int, default=15, help="lambda: min moves for a cell KDE")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="override a simulator constant (tuples as a/b/c)")
    ap.add_argument("--sweep", metavar="NAME=V1,V2,...",
                    help="run once per value of one simulator constant")
    ap.add_argument("--cost", action="store_true", help="also time one frame's evaluation")
    ap.add_argument("--json", help="write all results as JSON to this file")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)

    base = {}
    for item in args.set:
        name, _, val = item.partition("=")
        base[name.strip()] = parse_value(val)
    runs = [base]
    if args.sweep:
        name, _, vals = args.sweep.partition("=")
        runs = [{**base, name.strip(): parse_value(v)} for v in vals.split(",")]
    results = []
    for ov in runs:
        r = run_once(args, ov)
        report(r)
        results.append(r)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
