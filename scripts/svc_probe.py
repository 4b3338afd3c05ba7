#!/usr/bin/env python3
"""Readiness probes for scripts/services.sh (standard library only).

Usage:
  svc_probe.py tcp PORT                 TCP connect to 127.0.0.1:PORT
  svc_probe.py nats PORT                NATS INFO banner, must advertise JetStream
  svc_probe.py http URL [SUBSTRING]     HTTP 200 (and body contains SUBSTRING)
  svc_probe.py redis PORT               RESP "PING" -> "+PONG"
  svc_probe.py mongo HOST PORT          MongoDB wire protocol: OP_MSG hello + ping

Exit status 0 = healthy, 1 = not (reason on stderr). Each probe uses a short
socket timeout (NATTER_SVC_PROBE_TIMEOUT, default 2 s); the caller loops
with its own deadline.
"""
import json
import os
import socket
import struct
import sys
import urllib.request

TIMEOUT = float(os.environ.get("NATTER_SVC_PROBE_TIMEOUT", "2"))


def fail(msg):
    print(msg, file=sys.stderr)
    sys.exit(1)


def connect(host, port):
    try:
        return socket.create_connection((host, int(port)), timeout=TIMEOUT)
    except OSError as e:
        fail(f"connect {host}:{port}: {e}")


def recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            fail("connection closed by peer")
        buf += chunk
    return buf


def probe_tcp(port):
    connect("127.0.0.1", port).close()


def probe_nats(port):
    s = connect("127.0.0.1", port)
    try:
        line = b""
        while not line.endswith(b"\r\n"):
            chunk = s.recv(4096)
            if not chunk:
                fail("nats: connection closed before INFO")
            line += chunk
    except OSError as e:
        fail(f"nats: {e}")
    finally:
        s.close()
    if not line.startswith(b"INFO "):
        fail(f"nats: unexpected banner {line[:80]!r}")
    info = json.loads(line[5:].strip())
    if not info.get("jetstream"):
        fail("nats: server is up but JetStream is not enabled")
    print(f"nats-server {info.get('version')} jetstream=true")


def probe_http(url, needle=None):
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as r:
            body = r.read().decode("utf-8", "replace")
            if r.status != 200:
                fail(f"http {url}: status {r.status}: {body[:200]}")
    except Exception as e:  # HTTPError (e.g. 503 from /healthz), URLError, timeout
        fail(f"http {url}: {e}")
    if needle and needle not in body:
        fail(f"http {url}: body lacks {needle!r}: {body[:200]}")
    print(body.strip()[:200])


def probe_redis(port):
    s = connect("127.0.0.1", port)
    try:
        s.sendall(b"PING\r\n")
        reply = s.recv(64)
    except OSError as e:
        fail(f"redis: {e}")
    finally:
        s.close()
    if not reply.startswith(b"+PONG"):
        fail(f"redis: unexpected reply {reply!r}")
    print("PONG")


# --- minimal BSON, enough for {cmd: 1, $db: "admin"} and to read replies ---

def bson_encode(doc):
    out = b""
    for k, v in doc.items():
        key = k.encode() + b"\x00"
        if isinstance(v, bool):
            out += b"\x08" + key + (b"\x01" if v else b"\x00")
        elif isinstance(v, int):
            out += b"\x10" + key + struct.pack("<i", v)
        elif isinstance(v, str):
            data = v.encode() + b"\x00"
            out += b"\x02" + key + struct.pack("<i", len(data)) + data
        else:
            raise TypeError(type(v))
    return struct.pack("<i", len(out) + 5) + out + b"\x00"


_FIXED = {0x01: 8, 0x07: 12, 0x08: 1, 0x09: 8, 0x0A: 0, 0x10: 4, 0x11: 8,
          0x12: 8, 0x13: 16, 0x7F: 0, 0xFF: 0, 0x06: 0}


def bson_decode_top(buf):
    """Decode scalar top-level fields; nested documents are skipped."""
    (total,) = struct.unpack_from("<i", buf, 0)
    i, out = 4, {}
    while i < total - 1:
        t = buf[i]
        j = buf.index(b"\x00", i + 1)
        key = buf[i + 1:j].decode()
        i = j + 1
        if t == 0x01:
            out[key] = struct.unpack_from("<d", buf, i)[0]
        elif t == 0x10:
            out[key] = struct.unpack_from("<i", buf, i)[0]
        elif t == 0x12:
            out[key] = struct.unpack_from("<q", buf, i)[0]
        elif t == 0x08:
            out[key] = buf[i] == 1
        if t in _FIXED:
            i += _FIXED[t]
        elif t in (0x02, 0x0D, 0x0E):  # string, js code, symbol
            (n,) = struct.unpack_from("<i", buf, i)
            if t == 0x02:
                out[key] = buf[i + 4:i + 3 + n].decode("utf-8", "replace")
            i += 4 + n
        elif t in (0x03, 0x04, 0x0F):  # document, array, code_w_scope
            (n,) = struct.unpack_from("<i", buf, i)
            i += n
        elif t == 0x05:  # binary
            (n,) = struct.unpack_from("<i", buf, i)
            i += 5 + n
        elif t == 0x0B:  # regex: two cstrings
            i = buf.index(b"\x00", buf.index(b"\x00", i) + 1) + 1
        elif t == 0x0C:  # dbpointer
            (n,) = struct.unpack_from("<i", buf, i)
            i += 4 + n + 12
        else:
            raise ValueError(f"unknown BSON type 0x{t:02x}")
    return out


def op_msg(sock, request_id, doc):
    body = struct.pack("<I", 0) + b"\x00" + bson_encode(doc)
    header = struct.pack("<iiii", 16 + len(body), request_id, 0, 2013)
    sock.sendall(header + body)
    length, _, response_to, opcode = struct.unpack("<iiii", recv_exact(sock, 16))
    payload = recv_exact(sock, length - 16)
    if opcode != 2013 or response_to != request_id:
        fail(f"mongo: unexpected reply opcode={opcode} responseTo={response_to}")
    if payload[4] != 0:
        fail("mongo: reply does not start with a kind-0 section")
    return bson_decode_top(payload[5:])


def probe_mongo(host, port):
    s = connect(host, port)
    try:
        hello = op_msg(s, 1, {"hello": 1, "$db": "admin"})
        if hello.get("ok") != 1:
            fail(f"mongo: hello failed: {hello}")
        ping = op_msg(s, 2, {"ping": 1, "$db": "admin"})
        if ping.get("ok") != 1:
            fail(f"mongo: ping failed: {ping}")
    except (OSError, ValueError, struct.error) as e:
        fail(f"mongo: {e}")
    finally:
        s.close()
    print(f"mongo ok (maxWireVersion={hello.get('maxWireVersion')})")


def main(argv):
    if len(argv) < 2:
        fail(__doc__)
    kind, args = argv[1], argv[2:]
    probes = {"tcp": probe_tcp, "nats": probe_nats, "http": probe_http,
              "redis": probe_redis, "mongo": probe_mongo}
    if kind not in probes:
        fail(__doc__)
    probes[kind](*args)


if __name__ == "__main__":
    main(sys.argv)
