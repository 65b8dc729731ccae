#!/usr/bin/env python3
"""Compare `lhtstream.model.kdeamd_published` with the published KDE-AMD code's own results.

The published code (the authors' KDE-AMD repository) writes one CSV per type and
configuration, ``results/KDEAMD/TypeN/KDEAMD_{R}_{C}_{lambda}_{normal|gaussian002}.csv``
with columns ``Name,AnomalyScore``: each video's score clean and with 0.02 px^2
position noise, leave-one-out within the type. This tool reads those CSVs from a
local checkout, scores the same data set with our implementation, and prints per
type both AUCs and how far the per-video scores differ.

    # in a temp folder OUTSIDE this repository, in its own venv (numpy 1.23, scipy 1.10):
    #   run the published kde_amd.evaluate_model(35, 35, 15, "DATA/TypeN", ...) per type
    python tools/compare_published_kdeamd.py --published CHECKOUT --data DATA --types 1,12

``--published`` is the checkout (or its ``results`` folder); ``--data`` the data set
root it was run on (TypeN folders in the published format). Nothing here runs or
imports the published code, and no test or CI step needs it.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

from lhtstream.base.errors import LhtstreamError
from lhtstream.base.selection import parse_types
from lhtstream.base.stats import roc_auc
from lhtstream.io.dataset import Dataset
from lhtstream.model.kdeamd_published import CELLS, LAMBDA, leave_one_out, published_positions

NOISE_VARIANCE = 0.02  # the published protocol's; its files are named gaussian002
MAX_CSV_BYTES = 16 * 1024 * 1024


def results_folder(published: Path) -> Path:
    """The ``results/KDEAMD`` folder of a checkout, its ``results`` folder, or itself."""
    for cand in (published / "results" / "KDEAMD", published / "KDEAMD", published):
        if cand.is_dir() and any(cand.glob("Type*")):
            return cand
    raise LhtstreamError(f"{published}: no results/KDEAMD/TypeN folders (run the published "
                         f"code first, see this tool's --help)")


def read_scores(path: Path) -> dict[str, float]:
    """``Name,AnomalyScore`` rows of one published result CSV."""
    if not path.is_file():
        raise LhtstreamError(f"{path}: missing (did the published run finish this type?)")
    if path.stat().st_size > MAX_CSV_BYTES:
        raise LhtstreamError(f"{path}: larger than {MAX_CSV_BYTES} bytes, not a result CSV")
    out: dict[str, float] = {}
    with path.open(newline="") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if header != ["Name", "AnomalyScore"]:
            raise LhtstreamError(f"{path}: header {header}, expected Name,AnomalyScore")
        for line, row in enumerate(rows, start=2):
            if len(row) != 2:
                raise LhtstreamError(f"{path}:{line}: expected 2 fields, got {len(row)}")
            try:
                out[row[0]] = float(row[1])
            except ValueError:
                raise LhtstreamError(f"{path}:{line}: score {row[1]!r} is not a number") from None
    return out


def rel_diff(a: float, b: float) -> float:
    if a == b:  # equal infinities included
        return 0.0
    if not (math.isfinite(a) and math.isfinite(b)):
        return math.inf
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


def compare_type(folder: Path, data: Path, type_id: int, grid: int, lam: int) -> dict:
    stem = folder / f"Type{type_id}" / f"KDEAMD_{grid}_{grid}_{lam}"
    pub_clean = read_scores(Path(f"{stem}_normal.csv"))
    pub_noisy = read_scores(Path(f"{stem}_gaussian002.csv"))
    videos = list(Dataset(data).videos(types=[type_id]))
    names = [v.name for v in videos]
    missing = sorted(set(names) ^ set(pub_clean))
    if missing:
        raise LhtstreamError(f"Type{type_id}: videos {missing[:5]} are in only one of "
                             f"{data} and {stem}_normal.csv: not the same data set")
    t0 = time.perf_counter()
    pos = [published_positions(v.load()) for v in videos]
    obs = [v.obstacle_states() for v in videos]
    clean, noisy = leave_one_out(pos, obs, [NOISE_VARIANCE], cells=grid, lam=lam,
                                 names=names)[NOISE_VARIANCE]
    seconds = time.perf_counter() - t0
    d_clean = [rel_diff(c, pub_clean[n]) for c, n in zip(clean, names, strict=True)]
    d_noisy = [rel_diff(c, pub_noisy[n]) for c, n in zip(noisy, names, strict=True)]
    return {
        "type": type_id,
        "videos": len(names),
        "auc_published": roc_auc([pub_clean[n] for n in names], [pub_noisy[n] for n in names]),
        "auc_ours": roc_auc(clean, noisy),
        "max_rel_diff_clean": max(d_clean),
        "max_rel_diff_noisy": max(d_noisy),
        "seconds": seconds,
        "clean": (clean, [pub_clean[n] for n in names]),
        "noisy": (noisy, [pub_noisy[n] for n in names]),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--published", required=True, type=Path,
                    help="local checkout of the published code (or its results folder)")
    ap.add_argument("--data", required=True, type=Path, help="the data set it was run on")
    ap.add_argument("--types", default=None,
                    help="types to compare, e.g. 1,12,20-23 (default: every TypeN result)")
    ap.add_argument("--grid", type=int, default=CELLS, help="R = C of the result files")
    ap.add_argument("--lam", type=int, default=LAMBDA, help="lambda of the result files")
    ap.add_argument("--tolerance", type=float, default=1e-6,
                    help="largest relative score difference counted as equal")
    args = ap.parse_args(argv)
    try:
        folder = results_folder(args.published)
        if args.types:
            types = parse_types(args.types)
        else:
            types = sorted(int(p.name[4:]) for p in folder.glob("Type*") if p.name[4:].isdigit())
        rows = []
        for t in types:
            r = compare_type(folder, args.data, t, args.grid, args.lam)
            rows.append(r)
            print(f"Type{t:<3d} {r['videos']:>4d} videos  AUC published {r['auc_published']:.4f}"
                  f"  ours {r['auc_ours']:.4f}  max rel. score diff clean "
                  f"{r['max_rel_diff_clean']:.1e} noisy {r['max_rel_diff_noisy']:.1e}"
                  f"  ({r['seconds']:.0f} s)", flush=True)
    except LhtstreamError as e:
        print(f"compare_published_kdeamd: {e}", file=sys.stderr)
        return 2
    if not rows:
        print("compare_published_kdeamd: no types to compare", file=sys.stderr)
        return 2
    pc = [s for r in rows for s in r["clean"][1]]
    pn = [s for r in rows for s in r["noisy"][1]]
    oc = [s for r in rows for s in r["clean"][0]]
    on = [s for r in rows for s in r["noisy"][0]]
    worst = max(max(r["max_rel_diff_clean"], r["max_rel_diff_noisy"]) for r in rows)
    print(f"pooled ({len(pc)} videos): AUC published {roc_auc(pc, pn):.4f}  ours "
          f"{roc_auc(oc, on):.4f}  largest relative score difference {worst:.1e}")
    if worst > args.tolerance:
        print(f"scores differ by more than {args.tolerance:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
