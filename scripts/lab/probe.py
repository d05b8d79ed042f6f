#!/usr/bin/env python3
"""Small UDP/TCP probes for the NAT lab (run inside lab namespaces).

Every command is bounded in time and packet count and exits by itself.

  reflect  --udp IP:PORT... [--tcp IP:PORT...] [--duration S]
      Server (run on rv).  Replies to every UDP datagram with
      "SEEN <src-ip>:<src-port> <payload>" so clients learn their mapping.
      Extra verbs understood in the payload:
        POKE <from-ip:port> <token>  send <token> from the local socket bound
                                     at <from> to the sender's address
        REG <name>                   remember the sender's address under name
        GET <name>                   reply "PEER <name> <ip:port>" (or NONE)
      TCP listeners accept, write "HELLO <src>\\n" and close.
  map      --port P --server IP:PORT...   mapping seen by each server (JSON)
  filter   --port P --server IP:PORT --poke FROM...
      Talk only to --server, then ask it to have FROM sockets send to us;
      prints JSON {mapping, received: {FROM: bool}}.
  listen   --port P [--register IP:PORT] [--wait S]
      Print "MAPPED ip:port" (if --register), then print "GOT <src> <payload>"
      for every non-SEEN datagram and answer it with "ACK".
  send     --port P --to IP:PORT [--register IP:PORT]
      Send a few datagrams, print "MAPPED ..." and "ACKED <src>" or "NOACK".
  punch    --port P --server IP:PORT --name N --peer M [--duration S]
      Rendezvous via the reflect server and hole-punch to the peer's mapping;
      prints "PUNCH OK <peer-src>" or "PUNCH FAIL".
  rtt      --to IP:PORT [--count N] [--interval S] [--size B]
      UDP echo RTT, round-trip loss and payload integrity (JSON).
  tcp      --to IP:PORT   connect, print the banner (exit 1 on failure).
  sink     --port P [--idle S]    count UDP datagrams until idle; JSON rate
  blast    --to IP:PORT --count N --pps R [--size B]   paced UDP sender
"""

import argparse
import json
import os
import select
import socket
import statistics
import sys
import time


def hp(s):
    host, port = s.rsplit(":", 1)
    return host, int(port)


def fmt(addr):
    return "%s:%d" % (addr[0], addr[1])


def udp_socket(port, host="0.0.0.0"):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    return s


def recv_until(sock, deadline, want=None):
    """Receive datagrams until deadline; return first for which want() is true."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        r, _, _ = select.select([sock], [], [], left)
        if not r:
            return None
        try:
            data, src = sock.recvfrom(65535)
        except ConnectionRefusedError:  # ICMP unreachable from an earlier send
            continue
        if want is None or want(data, src):
            return data, src


def query_mapping(sock, server, tries=3, timeout=0.4):
    """Ask a reflect server which public ip:port it sees for this socket."""
    for i in range(tries):
        nonce = "MAP-%d-%f" % (i, time.time())
        try:
            sock.sendto(nonce.encode(), server)
        except OSError:
            pass
        got = recv_until(
            sock,
            time.monotonic() + timeout,
            lambda d, s: s == server and d.startswith(b"SEEN ") and d.endswith(nonce.encode()),
        )
        if got:
            return got[0].split()[1].decode()
    return None


def cmd_reflect(a):
    socks = {}
    for spec in a.udp:
        s = udp_socket(hp(spec)[1], hp(spec)[0])
        socks[s.fileno()] = s
    tcps = {}
    for spec in a.tcp:
        t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        t.bind(hp(spec))
        t.listen(16)
        tcps[t.fileno()] = t
    by_local = {fmt(s.getsockname()): s for s in socks.values()}
    registry = {}
    print("READY", flush=True)
    end = time.monotonic() + a.duration
    while time.monotonic() < end:
        r, _, _ = select.select(list(socks) + list(tcps), [], [], 0.5)
        for fd in r:
            if fd in tcps:
                c, src = tcps[fd].accept()
                try:
                    c.sendall(("HELLO %s\n" % fmt(src)).encode())
                finally:
                    c.close()
                continue
            s = socks[fd]
            try:
                data, src = s.recvfrom(65535)
            except OSError:
                continue
            words = data.split()
            try:
                if words[:1] == [b"POKE"] and len(words) == 3:
                    by_local[words[1].decode()].sendto(words[2], src)
                elif words[:1] == [b"REG"] and len(words) == 2:
                    registry[words[1]] = src
                    s.sendto(b"SEEN " + fmt(src).encode() + b" " + data, src)
                elif words[:1] == [b"GET"] and len(words) == 2:
                    peer = registry.get(words[1])
                    reply = b"PEER %s %s" % (words[1], fmt(peer).encode()) if peer else b"NONE"
                    s.sendto(reply, src)
                else:
                    s.sendto(b"SEEN " + fmt(src).encode() + b" " + data, src)
            except (OSError, KeyError) as e:
                print("reflect: %s" % e, file=sys.stderr, flush=True)
    return 0


def cmd_map(a):
    s = udp_socket(a.port)
    out = {srv: query_mapping(s, hp(srv)) for srv in a.server}
    print(json.dumps(out))
    return 0 if all(out.values()) else 1


def cmd_filter(a):
    s = udp_socket(a.port)
    server = hp(a.server)
    mapping = query_mapping(s, server)
    received = {f: False for f in a.poke}
    if mapping:
        tokens = {}
        for i, f in enumerate(a.poke):
            tok = "TOK%d-%d" % (i, a.port)
            tokens[tok.encode()] = f
            # Retries cover --loss; they never create state for other sources.
            for _ in range(2):
                s.sendto(("POKE %s %s" % (f, tok)).encode(), server)
        deadline = time.monotonic() + a.wait
        while True:
            got = recv_until(s, deadline, lambda d, src: d in tokens)
            if not got:
                break
            f = tokens[got[0]]
            if fmt(got[1]) == f:  # the NAT must present the poker's real address
                received[f] = True
    print(json.dumps({"mapping": mapping, "received": received}))
    return 0 if mapping else 1


def cmd_listen(a):
    s = udp_socket(a.port)
    if a.register:
        print("MAPPED %s" % query_mapping(s, hp(a.register)), flush=True)
    deadline = time.monotonic() + a.wait
    while True:
        got = recv_until(s, deadline, lambda d, src: not d.startswith(b"SEEN "))
        if not got:
            break
        print("GOT %s %s" % (fmt(got[1]), got[0].decode(errors="replace")), flush=True)
        s.sendto(b"ACK", got[1])
    return 0


def cmd_send(a):
    s = udp_socket(a.port)
    if a.register:
        print("MAPPED %s" % query_mapping(s, hp(a.register)), flush=True)
    to = hp(a.to)
    for _ in range(a.count):
        s.sendto(a.payload.encode(), to)
        got = recv_until(s, time.monotonic() + 0.3, lambda d, src: d == b"ACK")
        if got:
            print("ACKED %s" % fmt(got[1]))
            return 0
    print("NOACK")
    return 1


def cmd_punch(a):
    """Minimal ICE-like hole punch: register, learn peer, spray, answer."""
    s = udp_socket(a.port)
    server = hp(a.server)
    end = time.monotonic() + a.duration
    peer = None
    while peer is None and time.monotonic() < end:
        s.sendto(b"REG " + a.name.encode(), server)
        s.sendto(b"GET " + a.peer.encode(), server)
        got = recv_until(s, time.monotonic() + 0.2, lambda d, src: d.startswith(b"PEER "))
        if got:
            peer = hp(got[0].split()[2].decode())
    if peer is None:
        print("PUNCH FAIL (peer never registered)")
        return 1
    heard_from = None
    acked = False
    next_send = 0.0
    while time.monotonic() < end and not (acked and heard_from):
        now = time.monotonic()
        if now >= next_send:
            # After hearing the peer, answer its observed (peer-reflexive)
            # address: a symmetric NAT on the other side uses a new port.
            target = heard_from or peer
            s.sendto(b"PUNCH " + a.name.encode(), target)
            if heard_from:
                s.sendto(b"PACK " + a.name.encode(), target)
            next_send = now + 0.05
        got = recv_until(s, min(next_send, end), lambda d, src: d.startswith((b"PUNCH", b"PACK")))
        if got:
            heard_from = got[1]
            if got[0].startswith(b"PACK"):
                acked = True
    if acked and heard_from:
        # Keep answering briefly so the peer also sees our PACK.
        linger = time.monotonic() + 0.5
        while time.monotonic() < linger:
            s.sendto(b"PACK " + a.name.encode(), heard_from)
            recv_until(s, time.monotonic() + 0.05)
        print("PUNCH OK %s" % fmt(heard_from))
        return 0
    print("PUNCH FAIL")
    return 1


def cmd_rtt(a):
    """Echo RTT via a reflect server; also checks every echoed payload is
    byte-identical (--size > 1472 exercises IP fragmentation)."""
    s = udp_socket(0)
    to = hp(a.to)
    sent = {}
    rtts = []
    corrupt = 0

    def take(data):
        nonlocal corrupt
        parts = data.split(b" ", 2)
        if len(parts) != 3 or parts[0] != b"SEEN":
            return
        body = parts[2]
        key = body.split(b" ", 1)[0]
        if key in sent:
            t, payload = sent.pop(key)
            if body != payload:
                corrupt += 1
            rtts.append((time.monotonic() - t) * 1000.0)

    for i in range(a.count):
        payload = b"R%d " % i
        payload += os.urandom(max(a.size - len(payload), 0))
        sent[payload.split(b" ", 1)[0]] = (time.monotonic(), payload)
        s.sendto(payload, to)
        deadline = time.monotonic() + a.interval
        while True:
            got = recv_until(s, deadline)
            if not got:
                break
            take(got[0])
    deadline = time.monotonic() + a.drain  # late replies
    while sent:
        got = recv_until(s, deadline)
        if not got:
            break
        take(got[0])
    res = {
        "sent": a.count,
        "received": len(rtts),
        "loss_pct": round(100.0 * (a.count - len(rtts)) / a.count, 2),
        "corrupt": corrupt,
    }
    if rtts:
        res.update(
            min_ms=round(min(rtts), 2),
            median_ms=round(statistics.median(rtts), 2),
            # Nearest rank: one reply the machine's scheduler held up is not the link's jitter.
            p95_ms=round(sorted(rtts)[max(0, -(-95 * len(rtts) // 100) - 1)], 2),
            max_ms=round(max(rtts), 2),
        )
    print(json.dumps(res))
    return 0 if rtts and not corrupt else 1


def cmd_tcp(a):
    try:
        c = socket.create_connection(hp(a.to), timeout=a.timeout)
        c.settimeout(a.timeout)
        print(c.recv(200).decode().strip())
        return 0
    except OSError as e:
        print("TCPFAIL %s" % e)
        return 1


def cmd_sink(a):
    s = udp_socket(a.port)
    n = nbytes = 0
    first = last = None
    deadline = time.monotonic() + a.max_wait
    while True:
        got = recv_until(s, deadline)
        if not got:
            break
        last = time.monotonic()
        if first is None:
            first = last
        n += 1
        nbytes += len(got[0])
        deadline = last + a.idle
    res = {"packets": n, "bytes": nbytes}
    if n > 1 and last > first:
        res["mbit_s"] = round(nbytes * 8 / (last - first) / 1e6, 3)
    print(json.dumps(res))
    return 0


def cmd_blast(a):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    payload = b"x" * a.size
    to = hp(a.to)
    t0 = time.monotonic()
    for i in range(a.count):
        target = t0 + i / a.pps
        while True:
            left = target - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(left, 0.001))
        try:
            s.sendto(payload, to)
        except OSError:
            pass
    print(json.dumps({"sent": a.count, "seconds": round(time.monotonic() - t0, 3)}))
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("reflect")
    p.add_argument("--udp", action="append", default=[])
    p.add_argument("--tcp", action="append", default=[])
    p.add_argument("--duration", type=float, default=600)
    p = sub.add_parser("map")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--server", action="append", required=True)
    p = sub.add_parser("filter")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--server", required=True)
    p.add_argument("--poke", action="append", required=True)
    p.add_argument("--wait", type=float, default=0.6)
    p = sub.add_parser("listen")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--register")
    p.add_argument("--wait", type=float, default=5)
    p = sub.add_parser("send")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--to", required=True)
    p.add_argument("--register")
    p.add_argument("--payload", default="HELLO")
    p.add_argument("--count", type=int, default=5)
    p = sub.add_parser("punch")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--server", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--peer", required=True)
    p.add_argument("--duration", type=float, default=4)
    p = sub.add_parser("rtt")
    p.add_argument("--to", required=True)
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--interval", type=float, default=0.01)
    p.add_argument("--drain", type=float, default=1.0)
    p.add_argument("--size", type=int, default=0, help="payload bytes (random)")
    p = sub.add_parser("tcp")
    p.add_argument("--to", required=True)
    p.add_argument("--timeout", type=float, default=2)
    p = sub.add_parser("sink")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--idle", type=float, default=1.0)
    p.add_argument("--max-wait", type=float, default=10.0)
    p = sub.add_parser("blast")
    p.add_argument("--to", required=True)
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--pps", type=float, default=1000)
    p.add_argument("--size", type=int, default=1200)
    a = ap.parse_args()
    return globals()["cmd_" + a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
