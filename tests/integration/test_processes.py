"""The production entry points on their own: key checks, sd_notify, SIGTERM drain, side-by-side runs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.client import Client, connect
from tests.service import REPO, TidingsService, tidings_command


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*tidings_command(), *args], env=env, capture_output=True, text=True, timeout=30, cwd=REPO)


def _base_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
    env["TIDINGS_RUNTIME_DIR"] = str(tmp_path)
    return env


@pytest.mark.parametrize("role", ["hub", "worker"])
def test_production_roles_refuse_to_start_without_a_key(tmp_path: Path, role: str) -> None:
    env = _base_env(tmp_path)
    result = _run([role], env)
    assert result.returncode == 2
    assert "TIDINGS_JWT_SECRET" in result.stderr
    env["TIDINGS_JWT_SECRET"] = "too-short"
    result = _run([role], env)
    assert result.returncode == 2 and "shorter than 32 bytes" in result.stderr


def test_worker_refuses_without_api_key(tmp_path: Path) -> None:
    env = _base_env(tmp_path) | {"TIDINGS_JWT_SECRET": "s" * 40}
    result = _run(["worker"], env)
    assert result.returncode == 2 and "TIDINGS_API_KEY" in result.stderr


def test_bad_setting_is_named(tmp_path: Path) -> None:
    result = _run(["config"], _base_env(tmp_path) | {"TIDINGS_PORT": "eighty"})
    assert result.returncode == 2 and "TIDINGS_PORT" in result.stderr


class NotifySocket:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[str] = []

    def collect(self, until: str, timeout: float = 15.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.messages.extend(self.sock.recv(4096).decode().splitlines())
            except TimeoutError:
                pass
            if until in self.messages:
                return True
        return False


def test_sd_notify_ready_watchdog_stopping_and_drain(tmp_path: Path) -> None:
    from tests.service import free_port

    port, api_port = free_port(), free_port()
    env = _base_env(tmp_path) | {
        "TIDINGS_JWT_SECRET": "s" * 40, "TIDINGS_API_KEY": "k" * 20, "TIDINGS_PORT": str(port),
        "TIDINGS_API_PORT": str(api_port), "TIDINGS_DRAIN_WINDOW": "1", "WATCHDOG_USEC": "400000",
    }
    hub_sock = NotifySocket(tmp_path / "hub.notify")
    worker_sock = NotifySocket(tmp_path / "worker.notify")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(subprocess.Popen([*tidings_command(), "hub"], cwd=REPO,
                                      env=env | {"NOTIFY_SOCKET": str(tmp_path / "hub.notify")}))
        assert hub_sock.collect("READY=1")
        procs.append(subprocess.Popen([*tidings_command(), "worker", "--index", "0"], cwd=REPO,
                                      env=env | {"NOTIFY_SOCKET": str(tmp_path / "worker.notify")}))
        assert worker_sock.collect("READY=1")
        # READY means serving: the port accepts right away.
        token = _token(env["TIDINGS_JWT_SECRET"])
        client, _ = connect(f"ws://127.0.0.1:{port}/ws?token={token}")
        before = worker_sock.messages.count("WATCHDOG=1")
        time.sleep(1.0)
        worker_sock.collect("__never__", timeout=0.2)
        hub_sock.collect("__never__", timeout=0.2)
        assert worker_sock.messages.count("WATCHDOG=1") - before >= 2  # every 0.2 s from the loop
        assert hub_sock.messages.count("WATCHDOG=1") >= 2
        assert any(m.startswith("STATUS=") for m in worker_sock.messages)

        procs[1].send_signal(signal.SIGTERM)
        assert worker_sock.collect("STOPPING=1")
        code, _ = client.expect_close(timeout=5)
        assert code == 1001
        assert procs[1].wait(5) == 0
        procs[0].send_signal(signal.SIGTERM)
        assert hub_sock.collect("STOPPING=1")
        assert procs[0].wait(5) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _token(secret: str, sub: str = "notify", channels: list[str] | None = None) -> str:
    import jwt

    return jwt.encode({"sub": sub, "exp": int(time.time()) + 60, "channels": channels or []}, secret, "HS256")


def test_two_instances_side_by_side() -> None:
    with TidingsService(workers=1) as a, TidingsService(workers=1) as b:
        ca, _ = connect(a.ws_url(a.token("same", channels=["room:*"])))
        cb, _ = connect(b.ws_url(b.token("same", channels=["room:*"])))
        ca.subscribe("room:1")
        cb.subscribe("room:1")
        assert a.publish_http("room:1", "notification", {"from": "a"})[0] == 200
        assert ca.recv()["data"] == {"from": "a"}
        cb.nothing(0.3)
        # A token of one instance is refused by the other (different secrets).
        code, _ = Client(b.ws_url(a.token("x"))).expect_close()
        assert code == 4001


def test_reload_rotates_the_hs256_secret_from_the_env_file(tmp_path: Path) -> None:
    env_file = tmp_path / "tidings.env"
    old, new = "o" * 40, "n" * 40
    env_file.write_text(f"# keys\nTIDINGS_JWT_SECRET={old}\n")
    with TidingsService(workers=2, env={"TIDINGS_ENV_FILE": str(env_file)}) as svc:
        kept, _ = connect(svc.ws_url(_token(old, "kept")))
        env_file.write_text(f'TIDINGS_JWT_SECRET="{new}"\n')
        mark = len(svc.logs())
        assert svc.proc is not None
        svc.proc.send_signal(signal.SIGHUP)  # `tidings run` passes it to every worker
        deadline = time.monotonic() + 10
        while svc.logs()[mark:].count("reloaded keys") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert svc.logs()[mark:].count("reloaded keys") == 2
        for _ in range(6):  # whichever worker a connection lands on
            c, _ = connect(svc.ws_url(_token(new, "fresh")))
            c.close()
            c, _ = connect(svc.ws_url(_token(old, "old-still-ok")))  # within the overlap
            c.close()
        code, _ = Client(svc.ws_url(_token("x" * 40, "stranger"))).expect_close()
        assert code == 4001
        assert kept.request("ping")["type"] == "pong"  # nobody was dropped


def test_run_refuses_a_port_another_instance_holds() -> None:
    with TidingsService(workers=1) as first:
        second = TidingsService(workers=1, wait_ready=False, env={"TIDINGS_PORT": str(first.port)})
        second.start()
        try:
            assert second.proc is not None
            assert second.proc.wait(15) == 1
            assert f"127.0.0.1:{first.port} already in use" in second.logs()
        finally:
            second.stop()
        c, _ = connect(first.ws_url(first.token("still-mine")))  # the first one is untouched
        c.close()


def _policies(pid: int) -> dict[str, int]:
    """Thread name -> scheduling policy (0 SCHED_OTHER, 3 SCHED_BATCH) of every thread of pid."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        name = (task / "comm").read_text().strip()
        out[name] = os.sched_getscheduler(int(task.name))
    return out


@pytest.mark.parametrize("batch", [True, False])
def test_hub_and_workers_run_every_thread_as_sched_batch_unless_told_not_to(batch: bool) -> None:
    with TidingsService(workers=1, env={"TIDINGS_SCHED_BATCH": "1" if batch else "0"}) as svc:
        kids = svc.children()
        for role in ("hub", "worker 0"):
            policies = _policies(kids[role])
            assert "ZMQbg/IO/0" in policies  # ZeroMQ's I/O thread, started after the switch
            want = os.SCHED_BATCH if batch else os.SCHED_OTHER
            assert set(policies.values()) == {want}, (role, policies)
        assert os.sched_getscheduler(svc.proc.pid) == os.SCHED_OTHER  # the supervisor only waits
