#!/usr/bin/env python3
"""A router's port-mapping services, as far as discovery goes, for the NAT lab.

Run inside a NAT router's namespace (`natlab.sh exec LAB nata -- python3 portmap.py IP`), it
answers what `peer netcheck` probes, on every address of the router:

* NAT-PMP (RFC 6886) external-address requests on UDP 5351, reporting IP;
* PCP (RFC 6887) ANNOUNCE requests on the same port;
* SSDP M-SEARCH (UPnP IGD discovery) on UDP 1900, unicast and on 239.255.255.250.

Nothing is mapped: the lab's NATs are nftables rulesets; this only lets the probes be tested
against a router that offers the services and one that does not. Stdlib only; stops on SIGTERM.
"""

import ipaddress
import select
import signal
import socket
import struct
import sys
import time

START = int(time.time())


def nat_pmp_reply(request, external):
    if len(request) < 2 or request[0] != 0:
        return None
    if request[1] != 0:
        # Only the external-address opcode: anything else gets "unsupported opcode".
        return struct.pack("!BBHI", 0, 128 + request[1], 5, int(time.time()) - START)
    return struct.pack("!BBHI4s", 0, 128, 0, int(time.time()) - START, external.packed)


def pcp_reply(request):
    if len(request) < 24:
        return None
    if request[1] & 0x7F != 0:
        # Only ANNOUNCE: other opcodes get UNSUPP_OPCODE (4).
        result = 4
    else:
        result = 0
    return struct.pack("!BBBBII12x", 2, 0x80 | (request[1] & 0x7F), 0, result, 0,
                       int(time.time()) - START)


def ssdp_reply(request, location):
    text = request.decode("ascii", "replace")
    if not text.startswith("M-SEARCH"):
        return None
    if "ssdp:all" not in text and "InternetGatewayDevice" not in text \
            and "WANIPConnection" not in text:
        return None
    return ("HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\n"
            "ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
            "USN: uuid:natlab-igd::urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
            f"LOCATION: {location}\r\nSERVER: natlab/1 UPnP/1.1\r\nEXT:\r\n\r\n").encode()


def main():
    if len(sys.argv) != 2:
        print("usage: portmap.py EXTERNAL_IP", file=sys.stderr)
        return 2
    external = ipaddress.IPv4Address(sys.argv[1])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    pmp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    pmp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    pmp.bind(("0.0.0.0", 5351))
    ssdp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    ssdp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ssdp.bind(("0.0.0.0", 1900))
    try:
        membership = struct.pack("4s4s", socket.inet_aton("239.255.255.250"),
                                 socket.inet_aton("0.0.0.0"))
        ssdp.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
    except OSError:
        pass  # unicast discovery still works
    print("portmap: NAT-PMP and PCP on 5351, SSDP on 1900", flush=True)
    while True:
        ready, _, _ = select.select([pmp, ssdp], [], [])
        for sock in ready:
            data, peer = sock.recvfrom(2048)
            if sock is pmp:
                reply = pcp_reply(data) if data[:1] == b"\x02" else nat_pmp_reply(data, external)
            else:
                # The description URL is on the router's address the request came to.
                location = "http://{}:5000/rootDesc.xml".format(
                    local_address_towards(peer[0]))
                reply = ssdp_reply(data, location)
            if reply:
                sock.sendto(reply, peer)


def local_address_towards(ip):
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect((ip, 9))
        return probe.getsockname()[0]
    except OSError:
        return "0.0.0.0"
    finally:
        probe.close()


if __name__ == "__main__":
    sys.exit(main())
