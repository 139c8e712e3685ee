#!/usr/bin/env python3
"""fdatasync latency: appending to a file vs overwriting preallocated (zero-filled) space.

Why the write-ahead log zero-fills its segments before use. Run from the repository root:
    python3 benches/fsync_prealloc.py            # idle disk
    python3 benches/fsync_prealloc.py --busy     # with a concurrent 1 GB fsynced writer
"""
import os
import subprocess
import sys
import tempfile
import time


def measure(directory, prealloc, n=1500, size=4096):
    path = os.path.join(directory, "fsync-test.bin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    if prealloc:
        os.write(fd, b"\0" * (n * size))
        os.fsync(fd)
        os.lseek(fd, 0, 0)
    lat = []
    buf = b"x" * size
    for _ in range(n):
        os.write(fd, buf)
        t = time.perf_counter()
        os.fdatasync(fd)
        lat.append(time.perf_counter() - t)
    os.close(fd)
    os.unlink(path)
    lat.sort()
    pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000
    return pick(0.5), pick(0.9), pick(0.99), lat[-1] * 1000


def main():
    busy = "--busy" in sys.argv
    with tempfile.TemporaryDirectory(dir=".") as d:
        writer = None
        if busy:
            writer = subprocess.Popen(
                ["dd", "if=/dev/zero", f"of={d}/background.bin", "bs=1M", "count=1000", "conv=fsync", "status=none"])
        print(f"{'mode':10} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}  ({'busy' if busy else 'idle'} disk)")
        for prealloc in (False, True):
            p50, p90, p99, mx = measure(d, prealloc)
            print(f"{'prealloc' if prealloc else 'append':10} {p50:8.3f} {p90:8.3f} {p99:8.3f} {mx:8.3f}")
        if writer:
            writer.wait()


if __name__ == "__main__":
    main()
