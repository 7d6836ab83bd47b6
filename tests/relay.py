"""A transparent TCP relay for tests: what sits on the path between two owners and changes one byte.

An iptables rule (nat OUTPUT, REDIRECT) sends the owners' connections here; the relay reads each one's
real destination (SO_ORIGINAL_DST), connects there itself (its own sockets carry SO_MARK, which the rules
let through unredirected) and copies bytes both ways. Once one direction of one connection has carried
`--flip-at` bytes, the byte at that offset goes on with its lowest bit flipped: exactly one byte, once,
in the whole run. Or, with `--find HEX --put HEX`, the first time one received block of one direction
holds the bytes FIND, the bytes from there on are overwritten with PUT (same length on the wire: a
message replaced in place), once in the whole run. Every connection, the flip and the replacement are
logged, one line each, to `--log`.

Run it inside the owners' network namespace: `python tests/relay.py --port P --flip-at N --log FILE`;
it prints `listening` once it accepts connections and runs until terminated.
"""

from __future__ import annotations

import argparse
import socket
import struct
import sys
import threading

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h: the destination before REDIRECT rewrote it
MARK = 0x2A
"""SO_MARK of the relay's own connections: the namespace's rules must not redirect them back here."""

__all__ = ["MARK", "Relay"]


class Relay:
    """Accepts redirected connections on 127.0.0.1:`port`; flips the byte at offset `flip_at` of the first
    direction that gets that far (never, if `flip_at` is negative)."""

    def __init__(self, port: int, flip_at: int, log, find: bytes = b"", put: bytes = b""):
        self.flip_at, self.log = flip_at, log
        self.find, self.put = find, put
        self.flipped = False
        self._lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", port), backlog=64)

    def serve(self) -> None:
        while True:
            client, _ = self.server.accept()
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _say(self, line: str) -> None:
        with self._lock:
            self.log.write(line + "\n")
            self.log.flush()

    def _connect(self, client: socket.socket) -> None:
        raw = client.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)  # struct sockaddr_in
        port, ip = struct.unpack("!2xH4s8x", raw)
        dst = (socket.inet_ntoa(ip), port)
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK)
        try:
            server.connect(dst)
        except OSError as e:
            self._say(f"connect {dst[0]}:{dst[1]} failed: {e}")
            client.close()
            return
        for s in (client, server):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # gloo's small messages go on at once
        src = client.getpeername()
        self._say(f"connection {src[0]}:{src[1]} -> {dst[0]}:{dst[1]}")
        there = f"{src[1]}->{dst[1]}"
        back = threading.Thread(target=self._pipe, args=(server, client, f"{dst[1]}->{src[1]}"), daemon=True)
        back.start()
        self._pipe(client, server, there)
        back.join()
        client.close()
        server.close()

    def _pipe(self, src: socket.socket, dst: socket.socket, name: str) -> None:
        """Copy src to dst until src ends; the one flip happens here."""
        buf, seen = bytearray(1 << 16), 0
        view = memoryview(buf)
        try:
            while n := src.recv_into(buf):
                at = self.flip_at - seen
                if 0 <= at < n:
                    with self._lock:
                        flip, self.flipped = not self.flipped, True
                    if flip:
                        buf[at] ^= 0x01
                        self._say(f"flipped byte {self.flip_at} of {name}")
                where = buf.find(self.find, 0, n) if self.find else -1
                if where >= 0 and where + len(self.put) <= n:
                    with self._lock:
                        put, self.flipped = not self.flipped, True
                    if put:
                        buf[where : where + len(self.put)] = self.put
                        self._say(f"replaced {len(self.put)} bytes at byte {seen + where} of {name}")
                seen += n
                dst.sendall(view[:n])
            dst.shutdown(socket.SHUT_WR)  # pass the end of the stream on
        except OSError:  # one end went away: the other side learns it from the closed socket
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._say(f"{name} ended after {seen} bytes")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="where the REDIRECT rule sends connections")
    parser.add_argument("--flip-at", type=int, default=-1, help="offset of the byte to flip (-1: none)")
    parser.add_argument("--find", default="", help="hex: bytes to look for in a received block")
    parser.add_argument("--put", default="", help="hex: bytes written over them, from where they start")
    parser.add_argument("--log", required=True, help="one line per connection, stream end, and the flip")
    args = parser.parse_args(argv)
    with open(args.log, "a") as log:
        relay = Relay(args.port, args.flip_at, log, bytes.fromhex(args.find), bytes.fromhex(args.put))
        print("listening", flush=True)
        relay.serve()


if __name__ == "__main__":
    sys.exit(main())
