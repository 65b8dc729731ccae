"""Measure this host's floor for one ZeroMQ hop between two processes at 1 kHz.

The monitor's handling latency (done minus the frame's ``t_ns``) includes the hop
from replay to monitor: the sender's and receiver's ZeroMQ I/O threads and the
receiver waking up. This tool sends ~700-byte messages at 1000/s on the same
absolute schedule as ``lhtstream replay`` to a subscriber that does nothing but
receive, and prints that latency's percentiles: no monitor can do better on this
host. ``lhtstream bench`` runs it alternately with each end-to-end run
(docs/operations.md, "Latency floor"); on its own:

    python -m lhtstream.service.zmq_floor [--seconds 10]
        [--endpoint ipc:///tmp/zmq-floor.sock] [--save hop.npy]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import struct
import time
from typing import Any

import numpy as np
import zmq

PAYLOAD = b"\0" * 704  # a 16 x 22 uint16 frame


def publish(endpoint: str, count: int, ready: Any) -> None:
    """The sender (a child process): ``count`` messages at 1 kHz, each stamped at sending."""
    sock = zmq.Context().socket(zmq.PUB)
    sock.bind(endpoint)
    ready.wait(10)
    time.sleep(0.5)  # let the subscription reach the publisher
    t0 = time.monotonic_ns()
    for k in range(count):
        due = t0 + k * 1_000_000
        while (now := time.monotonic_ns()) < due:
            if due - now > 200_000:  # sleep, then spin the last 200 us, as replay does
                time.sleep((due - now - 200_000) / 1e9)
        sock.send_multipart([b"frame", struct.pack("<q", time.monotonic_ns()), PAYLOAD])
    time.sleep(0.5)
    sock.close(linger=0)


def main() -> None:
    """``python -m lhtstream.service.zmq_floor``: prints the percentiles (us)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the run")
    parser.add_argument("--endpoint", default="ipc:///tmp/zmq-floor.sock", help="endpoint")
    parser.add_argument("--save", metavar="FILE.npy",
                        help="also write every message's latency (us, float64) to this file")
    args = parser.parse_args()
    count = int(args.seconds * 1000)
    sub = zmq.Context().socket(zmq.SUB)
    sub.connect(args.endpoint)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    ready = mp.Event()
    sender = mp.Process(target=publish, args=(args.endpoint, count, ready))
    sender.start()
    ready.set()
    latencies = np.zeros(count)
    n = 0
    try:
        while n < count and sub.poll(3000):
            parts = sub.recv_multipart()
            latencies[n] = (time.monotonic_ns() - struct.unpack("<q", parts[1])[0]) / 1000
            n += 1
    finally:
        sender.join(10)
        if sender.is_alive():
            sender.kill()
    lat = latencies[:n]
    if args.save:
        np.save(args.save, lat)
    p50, p99, p999 = np.percentile(lat, (50, 99, 99.9))
    print(f"{n} messages: p50 {p50:.0f} us, p99 {p99:.0f} us, p99.9 {p999:.0f} us, "
          f"max {lat.max():.0f} us, over 1 ms: {(lat > 1000).sum()}")


if __name__ == "__main__":
    main()
