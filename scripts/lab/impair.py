#!/usr/bin/env python3
"""Userspace link impairment shim for the NAT lab (replacement for tc netem).

The kernel of the lab machines has no sch_netem, so an impaired link is built
from two persistent TUN devices, one in each namespace of the link, e.g.
`wan` in LAB-nata and `to-nata` in LAB-inet.  Whatever the kernel routes out
of one TUN is read here, optionally dropped, held for the configured delay
and then written, byte for byte, into the other TUN, where the kernel
receives it as if it had arrived on a wire.  Both directions are handled by
the same single-threaded loop.

Semantics (per direction, i.e. each way across the link independently):
  * delay:  every packet is held  delay/2 + uniform(-jitter/2, +jitter/2) ms
            (clamped at 0), so the round trip across ONE link adds `delay` ms
            on average and varies within delay +- jitter.
  * order:  packets are never reordered: a packet is released no earlier than
            the packet in front of it (FIFO), like a real serial link.
  * loss:   every packet is dropped independently with probability loss%.
  * queue:  at most --queue packets (and --queue-bytes bytes) are held per
            direction; beyond that packets are tail-dropped (counted).

The shim exits by itself when either namespace is deleted (checked twice a
second), when a TUN fd fails, or on SIGTERM/SIGINT.  Statistics are written
as JSON to --stats (about once a second and at exit).
"""

import argparse
import collections
import ctypes
import errno
import fcntl
import json
import os
import random
import select
import signal
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"
MAX_PKT = 65536


def setns(fd):
    """Enter the network namespace behind fd (os.setns exists only in 3.12+)."""
    if hasattr(os, "setns"):
        os.setns(fd, CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "setns: " + os.strerror(err))


def ns_inode(name):
    try:
        return os.stat(os.path.join(NETNS_DIR, name)).st_ino
    except FileNotFoundError:
        return None


def open_tun(ns, dev):
    """Attach to the persistent TUN `dev` that lives in namespace `ns`.

    TUNSETIFF looks the device up in the caller's namespace, so we hop into
    `ns`, attach, and hop back; the fd stays bound to that device.
    """
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(os.path.join(NETNS_DIR, ns), os.O_RDONLY)
    try:
        setns(target)
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        ifr = struct.pack("16sH", dev.encode(), IFF_TUN | IFF_NO_PI)
        fcntl.ioctl(fd, TUNSETIFF, ifr)
    finally:
        setns(home)
        os.close(home)
        os.close(target)
    return fd


class Direction:
    def __init__(self, name, rfd, wfd, args, rng):
        self.name = name
        self.rfd = rfd
        self.wfd = wfd
        self.args = args
        self.rng = rng
        self.q = collections.deque()
        self.qbytes = 0
        self.last_release = 0.0
        self.stats = collections.Counter()

    def delay_s(self):
        d = self.args.delay_ms / 2.0
        if self.args.jitter_ms > 0:
            d += self.rng.uniform(-self.args.jitter_ms / 2.0, self.args.jitter_ms / 2.0)
        return max(d, 0.0) / 1000.0

    def ingest(self, now):
        """Read everything currently pending (bounded batch) from rfd."""
        for _ in range(256):
            try:
                pkt = os.read(self.rfd, MAX_PKT)
            except BlockingIOError:
                return
            if not pkt:
                return
            self.stats["rx"] += 1
            if self.args.loss > 0 and self.rng.random() * 100.0 < self.args.loss:
                self.stats["lost"] += 1
                continue
            if len(self.q) >= self.args.queue or self.qbytes + len(pkt) > self.args.queue_bytes:
                self.stats["overflow"] += 1
                continue
            release = max(now + self.delay_s(), self.last_release)
            self.last_release = release
            self.q.append((release, pkt))
            self.qbytes += len(pkt)

    def flush_due(self, now):
        while self.q and self.q[0][0] <= now:
            _, pkt = self.q.popleft()
            self.qbytes -= len(pkt)
            try:
                os.write(self.wfd, pkt)
                self.stats["tx"] += 1
            except OSError as e:
                # EIO: peer TUN down; ENOBUFS/EAGAIN: kernel backlog full.
                # Either way the packet is lost, like on a real link.
                if e.errno not in (errno.EIO, errno.ENOBUFS, errno.EAGAIN, errno.EINVAL):
                    raise
                self.stats["write_err"] += 1

    def next_due(self):
        return self.q[0][0] if self.q else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--left", required=True, help="NS:DEV of the first TUN (e.g. lab1-nata:wan)")
    ap.add_argument("--right", required=True, help="NS:DEV of the second TUN (e.g. lab1-inet:to-nata)")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="added round-trip time across the link")
    ap.add_argument("--jitter-ms", type=float, default=0.0, help="RTT varies within delay +- jitter")
    ap.add_argument("--loss", type=float, default=0.0, help="drop probability in percent, per direction")
    ap.add_argument("--queue", type=int, default=4096, help="max packets held per direction")
    ap.add_argument("--queue-bytes", type=int, default=8 << 20, help="max bytes held per direction")
    ap.add_argument("--seed", type=int, default=None, help="RNG seed (reproducible loss/jitter)")
    ap.add_argument("--stats", default=None, help="write JSON counters to this file")
    ap.add_argument("--ready", default=None, help="touch this file once both TUNs are attached")
    args = ap.parse_args()

    lns, ldev = args.left.split(":", 1)
    rns, rdev = args.right.split(":", 1)
    watched = {n: ns_inode(n) for n in (lns, rns)}
    if None in watched.values():
        sys.exit("impair: namespace missing: %r" % watched)

    lfd = open_tun(lns, ldev)
    rfd = open_tun(rns, rdev)
    rng = random.Random(args.seed)
    dirs = [
        Direction("%s->%s" % (args.left, args.right), lfd, rfd, args, rng),
        Direction("%s->%s" % (args.right, args.left), rfd, lfd, args, rng),
    ]
    by_fd = {d.rfd: d for d in dirs}

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))

    def write_stats():
        if not args.stats:
            return
        doc = {
            "pid": os.getpid(),
            "delay_ms": args.delay_ms,
            "jitter_ms": args.jitter_ms,
            "loss_pct": args.loss,
            "directions": {d.name: dict(d.stats, queued=len(d.q)) for d in dirs},
        }
        tmp = args.stats + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, args.stats)

    if args.ready:
        with open(args.ready, "w") as f:
            f.write(str(os.getpid()))

    next_check = 0.0
    try:
        while not stop:
            now = time.monotonic()
            if now >= next_check:
                # Exit when the lab is torn down: `ip netns del` only removes
                # the name, our fds would keep the namespaces alive forever.
                for n, ino in watched.items():
                    if ns_inode(n) != ino:
                        return 0
                write_stats()
                next_check = now + 0.5
            dues = [t for t in (d.next_due() for d in dirs) if t is not None]
            timeout = min(dues + [next_check]) - now
            try:
                ready, _, _ = select.select(list(by_fd), [], [], max(timeout, 0.0))
            except InterruptedError:
                continue
            now = time.monotonic()
            for fd in ready:
                by_fd[fd].ingest(now)
            for d in dirs:
                d.flush_due(now)
    except OSError as e:
        print("impair: %s" % e, file=sys.stderr)
        return 1
    finally:
        try:
            write_stats()
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
