"""Who is still here: one idle TCP connection to every peer, so a dead owner is noticed in milliseconds.

gloo notices a dead peer only inside a collective, and an owner spends most of a round training
locally: the survivors would learn of a death at the next unify, or, with a stalled link, only after
dist.timeout_s. Here every pair of ranks holds one socket that carries nothing but a last word. When an
owner's process ends for any reason (kill -9, OOM, a crash), its kernel closes the socket and every peer
sees the end of the stream at once. An owner that leaves in an orderly way says so first (one byte:
done, or failed with its own error), so only an unannounced close counts as a death. TCP keep-alive
probes (the kernel's, every second after 5 idle seconds) turn a machine that vanished without a word
into a closed connection within about 10 s. A peer that is alive but silent (a stalled process) keeps
its connection and its kernel answers the probes: that stays a timeout, as it should.

A death seen between collectives interrupts the main thread (a simulated SIGURG, whose handler raises
PeerGone), so the survivor stops and torchrun can re-form the group without waiting for the next
collective. SIGURG because nobody else sends it to us (its default is to be ignored): SIGUSR1 would take
Slurm's pre-emption warning away from the user. Inside a collective, gloo fails on its own;
`unify_dist.distributed.stage` then asks the watch who is gone. Nothing crosses these sockets but four
bytes of rank and one byte of last word: no data, nothing to unpickle. Like the rendezvous port, the
listener is open to anyone during start-up: with trust on, someone who reaches it then can stop the run
(denial of service, which trust does not claim to prevent), not read or change anything.
"""

from __future__ import annotations

import selectors
import signal
import socket
import struct
import threading
import time
import _thread
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI imports PeerGone from here: no torch import for that
    import torch.distributed as dist

__all__ = ["PeerGone", "Watch", "DONE", "FAILED"]

DONE, FAILED = b"D", b"F"
"""An owner's last word on its watch connections: it finished, or it stops with its own error."""
_SIGNAL = signal.SIGURG
_KEY = "unify_dist/watch/{rank}"
_ROUTE_KEY = "unify_dist/watch/route/{rank}"


class PeerGone(BaseException):
    """A peer's connection closed without a last word: its process or its machine is gone.

    A BaseException, like KeyboardInterrupt, because it can interrupt the main thread anywhere; no
    `except Exception` on the way (a checkpoint reader, a cleanup) may swallow it and carry on.
    """


@dataclass
class _Peer:
    rank: int
    sock: socket.socket
    said: bytes = b""
    closed_at: float | None = None


def _route_to(host: str, port: int = 9) -> str:
    """The address of this machine's interface that routes to `host` (connect() on UDP sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, port))
        return s.getsockname()[0]


def _interface_address(name: str) -> str:
    """The IPv4 address of network interface `name` (Linux's SIOCGIFADDR)."""
    import fcntl

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            answer = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
        except OSError as e:
            raise ConnectionError(f"GLOO_SOCKET_IFNAME names interface '{name}', which has no IPv4 address here ({e})") from None
    return socket.inet_ntoa(answer[20:24])


def _reachable_address(
    rank: int, world_size: int, store: dist.Store, master: str, master_port: int, interface: str | None
) -> str:
    """What the other ranks can reach this rank at: GLOO_SOCKET_IFNAME's interface when the user chose one
    for gloo, else the interface towards the master, as a rule.

    On the master's own machine the master's name may resolve to a loopback address (Debian maps the
    host name to 127.0.1.1), which owners on other machines cannot reach. Every rank first publishes its
    route to the master; a rank whose route is loopback takes the interface towards a rank that found a
    real one (that rank is on another machine). Ranks that all share one machine keep loopback, which
    reaches them all.
    """
    route = _interface_address(interface) if interface else _route_to(master, master_port)
    store.set(_ROUTE_KEY.format(rank=rank), route)
    if not route.startswith("127."):
        return route
    for peer in range(world_size):
        theirs = store.get(_ROUTE_KEY.format(rank=peer)).decode()  # waits until that rank has published
        if not theirs.startswith("127."):
            return _route_to(theirs)
    return route


def _keep_alive(sock: socket.socket) -> None:
    """Kernel probes after 5 idle seconds, every second, 5 unanswered: a vanished machine in ~10 s."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 1), ("TCP_KEEPCNT", 5)):
        if hasattr(socket, name):  # Linux names; elsewhere the system's defaults apply
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


class Watch:
    """This rank's connections to every other rank of the group, watched by a daemon thread."""

    def __init__(
        self, rank: int, world_size: int, store: dist.Store, master: str, master_port: int, timeout_s: float,
        interface: str | None = None,
    ):  # fmt: skip
        self.rank, self.world_size = rank, world_size
        self.names: list[str] = []
        """Owners' names by rank, once the group has agreed on them (messages name owners, not only ranks)."""
        self.doing = "start-up"
        """The last collective stage entered (unify_dist.distributed.stage): where this owner was."""
        self.inside = 0
        """How many collective stages this owner is in now: there, gloo fails by itself and the stage reports."""
        self._peers: dict[int, _Peer] = {}
        self._changed = threading.Condition()
        self._armed = False
        self._reported = False
        host = _reachable_address(rank, world_size, store, master, master_port, interface)
        self._connect(store, host, timeout_s)
        self._thread = threading.Thread(target=self._watch, name="unify-dist-watch", daemon=True)
        self._thread.start()

    def _connect(self, store: dist.Store, host: str, timeout_s: float) -> None:
        """A full mesh: each rank connects to every lower rank and accepts every higher one."""
        listener = socket.create_server((host, 0), backlog=self.world_size)
        try:
            store.set(_KEY.format(rank=self.rank), f"{host}:{listener.getsockname()[1]}")
            for peer in range(self.rank):  # the peer's listener queues us even before it accepts
                peer_host, _, port = store.get(_KEY.format(rank=peer)).decode().rpartition(":")
                try:
                    sock = socket.create_connection((peer_host, int(port)), timeout=timeout_s)
                except OSError as e:
                    raise ConnectionError(
                        f"rank {self.rank} cannot reach rank {peer}'s watch at {peer_host}:{port} ({e}); owners must "
                        "reach each other on the interface that routes to the master (set GLOO_SOCKET_IFNAME as for gloo)"
                    ) from None
                sock.sendall(struct.pack("!I", self.rank))
                self._add(peer, sock)
            listener.settimeout(timeout_s)
            while len(self._peers) < self.world_size - 1:
                try:
                    sock, _ = listener.accept()
                except TimeoutError:
                    missing = sorted(set(range(self.rank + 1, self.world_size)) - set(self._peers))
                    raise ConnectionError(
                        f"rank {self.rank} waited {timeout_s:.0f} s at {host} for ranks {missing} to connect to its "
                        "watch; they cannot reach this address (a firewall, or the wrong interface: set GLOO_SOCKET_IFNAME)"
                    ) from None
                sock.settimeout(timeout_s)
                peer = struct.unpack("!I", _read_exactly(sock, 4))[0]
                if not self.rank < peer < self.world_size or peer in self._peers:
                    sock.close()  # not one of ours (a stray connection to the port): keep waiting
                    continue
                self._add(peer, sock)
        finally:
            listener.close()

    def _add(self, rank: int, sock: socket.socket) -> None:
        sock.settimeout(None)
        _keep_alive(sock)
        self._peers[rank] = _Peer(rank, sock)

    def _watch(self) -> None:
        selector = selectors.DefaultSelector()
        for peer in self._peers.values():
            selector.register(peer.sock, selectors.EVENT_READ, peer)
        while selector.get_map():
            for key, _ in selector.select():
                peer: _Peer = key.data
                try:
                    data = peer.sock.recv(16)
                except OSError:  # reset, or keep-alive probes unanswered
                    data = b""
                with self._changed:
                    if data:
                        peer.said = data[-1:]
                        continue
                    selector.unregister(peer.sock)
                    peer.closed_at = time.monotonic()
                    self._changed.notify_all()
                    if self._armed and not peer.said and not self._reported:
                        _thread.interrupt_main(_SIGNAL)  # the handler runs in the main thread, between bytecodes

    def arm(self) -> None:
        """From now on a death stops the main thread at once (elsewhere, at the next collective's failure)."""
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set a signal handler; the stages still name the dead peer
        signal.signal(_SIGNAL, self._on_signal)
        self._armed = True
        if self.gone():
            _thread.interrupt_main(_SIGNAL)

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.inside:  # the stage reports it, knowing where it was (and checks again when it ends)
            return
        if self._armed and not self._reported and self.gone():
            self._reported = True
            raise PeerGone(self.describe(f"while this owner was between collectives (the last was '{self.doing}')"))

    def gone(self) -> list[_Peer]:
        """Peers whose connection closed without a last word, first to close first."""
        with self._changed:
            dead = [p for p in self._peers.values() if p.closed_at is not None and not p.said]
        return sorted(dead, key=lambda p: p.closed_at or 0.0)

    def failed(self) -> list[_Peer]:
        """Peers that said they stop with their own error."""
        with self._changed:
            return [p for p in self._peers.values() if p.said == FAILED and p.closed_at is not None]

    def wait_for_news(self, limit_s: float) -> None:
        """Wait until some peer's connection has closed (or `limit_s` passed): gloo may be faster than us."""
        deadline = time.monotonic() + limit_s
        with self._changed:
            while not any(p.closed_at is not None for p in self._peers.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._changed.wait(left)

    def name(self, rank: int) -> str:
        who = f"owner '{self.names[rank]}'" if rank < len(self.names) else "the owner"
        return f"{who} (rank {rank})"

    def describe(self, where: str) -> str:
        """One line: who is gone, that its connection closed, where this owner was and how long it took."""
        dead = self.gone()
        first = dead[0]
        others = f"; also gone: {', '.join(self.name(p.rank) for p in dead[1:])}" if dead[1:] else ""
        late = time.monotonic() - (first.closed_at or time.monotonic())
        self._reported = True
        return (
            f"rank {self.rank}: {self.name(first.rank)} is gone: its connection closed {where}, and this owner "
            f"stopped {late:.1f} s later (its process ended or its machine went away){others}"
        )

    def close(self, last_word: bytes) -> None:
        """Say `last_word` to every peer and stop interrupting: this owner leaves in an orderly way."""
        self._armed = False
        for peer in self._peers.values():
            try:
                peer.sock.sendall(last_word)
            except OSError:
                pass  # that peer is gone already


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("a peer closed its watch connection during start-up")
        data += chunk
    return data
