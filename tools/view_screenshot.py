#!/usr/bin/env python3
"""Make the README's screenshot of `lhtstream view` (docs/view.png).

Starts the demo's monitor, `lhtstream view` and a two-stream replay of the demo's data
set (cached like `lhtstream demo`'s), waits until an alarm is in the log, and has
Debian's Chromium (through Playwright) photograph the page.

    python tools/view_screenshot.py                 # writes docs/view.png
    python tools/view_screenshot.py --out shot.png --wait 12
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from pathlib import Path

from lhtstream.cli.demo import default_cache, prepare
from lhtstream.service.harness import Child, short_tempdir

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "view.png"))
    parser.add_argument("--wait", type=float, default=10.0,
                        help="seconds to stream after the first alarm (default %(default)s)")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--patience", type=float, default=120.0,
                        help="seconds to wait for an alarm with p99 < 1 ms (default %(default)s)")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright  # local import: a test extra

    prepared = prepare(default_cache())
    folder = short_tempdir("lht-shot-")
    frames, pub = f"ipc://{folder}/frames", f"ipc://{folder}/out"
    children: list[Child] = []
    try:
        monitor = Child(["-m", "lhtstream.cli", "monitor", "--frames", frames, "--publish", pub,
                         "--model", str(prepared.model), "--journal",
                         str(folder / "journal.sqlite"), "--status-interval", "0.5"], "monitor")
        children.append(monitor)
        monitor.wait_for(r"ready in", 300)
        view = Child(["-m", "lhtstream.cli", "view", "--monitor", pub, "--frames", frames,
                      "--model", str(prepared.model), "--journal",
                      str(folder / "journal.sqlite"), "--port", "0"], "view")
        children.append(view)
        url = view.wait_for(r"serving (http://\S+/)", 60).group(1)
        children.append(Child(["-m", "lhtstream.cli", "replay", str(prepared.live),
                               "--endpoint", frames, "--streams", "2", "--loop",
                               "--wait-subscribers", "2"], "replay"))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with urllib.request.urlopen(url + "api/state", timeout=5) as response:
                events = json.loads(response.read())["events"]
            if any(e["topic"] == "alarm" and e["state"] == "raise" for e in events):
                break
            time.sleep(0.5)
        time.sleep(args.wait)
        with sync_playwright() as p:  # the browser's own load stays out of the run above
            browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1000},
                                    device_scale_factor=0.75)
            page.goto(url)
            page.wait_for_selector("#stream-ws2 .path .trace", timeout=20_000)
            time.sleep(3)  # a few state updates: strips filled, logs populated
            # a moment with a stream in alarm (red) and, where the machine allows, the
            # monitor's p99 under 1 ms (the browser shares this host with the monitor)
            quiet = """() => [...document.querySelectorAll('#overview tbody tr')].every(
                r => parseFloat(r.cells[5].textContent.replace(/,/g, '')) < 1000)"""
            deadline = time.monotonic() + args.patience
            while time.monotonic() < deadline:
                page.wait_for_selector("#overview .badge.alarm", timeout=60_000)
                if page.evaluate(quiet):
                    break
                time.sleep(0.2)
            page.wait_for_selector("#overview .badge.alarm", timeout=60_000)
            page.screenshot(path=args.out)
            browser.close()
        print(f"wrote {args.out} ({Path(args.out).stat().st_size // 1024} KiB)")
    finally:
        for child in reversed(children):
            child.stop(timeout=5.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
