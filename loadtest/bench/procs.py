"""/proc readers: the process tree of a server, its CPU time, its RSS, who holds a socket.

Everything here reads /proc directly (no psutil) so the bench measures exactly what the
kernel reports: utime+stime from /proc/PID/stat and VmRSS from /proc/PID/status.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")  # stat's utime/stime are in clock ticks (100 Hz here)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'
    return raw[raw.rindex(")") + 2 :].split()


def descendants(root: int) -> list[int]:
    """root and every live descendant (children of children too), by scanning ppid in /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    out: list[int] = []
    todo = [root] if _stat_fields(root) is not None else []
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def cpu_seconds(pids: Iterable[int]) -> float:
    """Sum of utime+stime (seconds) of the given processes; vanished processes count 0."""
    user, system = cpu_split(pids)
    return user + system


def cpu_split(pids: Iterable[int]) -> tuple[float, float]:
    """(utime, stime) in seconds, summed: user space (Python, picows) vs kernel (syscalls, TCP)."""
    user = system = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            user += int(fields[11])  # stat field 14
            system += int(fields[12])  # stat field 15
    return user / CLK_TCK, system / CLK_TCK


def cpu_by_thread(pid: int) -> dict[str, float]:
    """utime+stime (seconds) of each thread of pid, keyed "tid:name" (ZeroMQ names its I/O
    thread ZMQbg/IO/0, so the hub's Python loop and its I/O thread can be told apart)."""
    out: dict[str, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            raw = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        out[f"{tid}:{name}"] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def rss_kib(pids: Iterable[int]) -> int:
    """Sum of VmRSS (KiB). Shared pages count once per process; the bench uses deltas."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            continue
    return total


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _socket_inodes_for_peer(local_port: int, peer_port: int) -> set[int]:
    """Inodes of TCP sockets whose local port is local_port and remote port is peer_port."""
    inodes: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            lport = int(parts[1].rsplit(":", 1)[1], 16)
            rport = int(parts[2].rsplit(":", 1)[1], 16)
            if lport == local_port and rport == peer_port:
                inodes.add(int(parts[9]))
    return inodes


def owner_of_connection(pids: Iterable[int], server_port: int, client_port: int) -> int | None:
    """Which of pids holds the server end of the TCP connection from client_port (or None)."""
    inodes = _socket_inodes_for_peer(server_port, client_port)
    if not inodes:
        return None
    wanted = {f"socket:[{i}]" for i in inodes}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                    return pid
            except OSError:
                continue
    return None
