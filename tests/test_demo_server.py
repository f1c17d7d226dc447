"""`VllmServer`'s process handling, against a stand-in `vllm` (a tiny HTTP server that
answers /health with its PROMETHEUS_MULTIPROC_DIR): a port taken before the server binds it
is retried on another, a port the caller chose is not, a user's metrics dir is kept and ours
removed, and nothing of the group is left. The real `vllm serve` runs in test_demo.py and
test_vllm_serve.py."""

import os
import shlex
import signal
import socket
import sys
import threading
import time

import httpx
import pytest

from mole_serve.demo import server as server_module
from mole_serve.demo.server import ServerError, VllmServer, live_group_members

STAND_IN = """import http.server, os, sys

port = int(sys.argv[sys.argv.index("--port") + 1])


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(os.environ.get("PROMETHEUS_MULTIPROC_DIR", "").encode())

    def log_message(self, *args):
        pass


if os.environ.get("STAND_IN_STUBBORN_CHILD"):  # a member of the group that ignores SIGTERM
    import subprocess                            # (it says so in that file once it does)
    subprocess.Popen([sys.executable, "-c", "import pathlib, signal, sys, time; "
                      "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                      "pathlib.Path(sys.argv[1]).touch(); time.sleep(600)",
                      os.environ["STAND_IN_STUBBORN_CHILD"]])
try:
    served = http.server.HTTPServer(("127.0.0.1", port), Health)
except OSError as exc:
    print(f"ERROR: {exc}", flush=True)  # "[Errno 98] Address already in use", as vLLM's
    sys.exit(1)
served.serve_forever()
"""


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    program = tmp_path / "stand_in.py"
    program.write_text(STAND_IN)
    script = tmp_path / "vllm"  # a shell wrapper: a #! line cannot hold any path
    script.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} "
                      f"{shlex.quote(str(program))} \"$@\"\n")
    script.chmod(0o755)
    monkeypatch.setattr(server_module, "vllm_executable", lambda: str(script))
    return tmp_path


@pytest.fixture
def taken_port():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield held.getsockname()[1]


def test_a_port_taken_before_the_server_binds_it_is_retried(stand_in, taken_port, monkeypatch):
    picked = iter([taken_port])
    real_free_port = server_module.free_port
    monkeypatch.setattr(server_module, "free_port", lambda: next(picked, None)
                        or real_free_port())
    with VllmServer("model", [], log_path=stand_in / "log", metrics=False) as served:
        assert served.port != taken_port
        assert httpx.get(f"{served.url}/health").status_code == 200
        group = served.pgid
    assert live_group_members(group) == []


def test_a_port_the_caller_chose_is_not_replaced(stand_in, taken_port):
    with pytest.raises(ServerError, match="Address already in use"):
        with VllmServer("model", [], log_path=stand_in / "log", port=taken_port,
                        metrics=False):
            pass


def test_metrics_dir_ours_removed_a_users_kept(stand_in, capsys):
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    with VllmServer("model", [], log_path=stand_in / "log", env=env) as served:
        ours = httpx.get(f"{served.url}/health").text
        assert ours and os.path.isdir(ours)
    assert not os.path.exists(ours)
    users = stand_in / "prometheus"
    users.mkdir()
    (users / "counter_1.db").write_bytes(b"")  # an earlier run's
    with VllmServer("model", [], log_path=stand_in / "log",
                    env={**env, "PROMETHEUS_MULTIPROC_DIR": str(users)}) as served:
        assert httpx.get(f"{served.url}/health").text == str(users)
    assert users.is_dir()
    assert "holds an earlier run's metrics" in capsys.readouterr().err


class Interrupted(Exception):
    pass


def test_a_signal_while_stopping_is_held_until_the_group_is_gone(stand_in, monkeypatch):
    """A second Ctrl-C / SIGTERM during the stop must not cut it short (orphans). With
    another thread running, the kernel may hand the signal to that thread: a signal mask on
    the main thread did not hold it off."""
    finished = []
    real_stop_group = VllmServer._stop_group

    def stop_group_signalled_midway(self):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.3)  # the handler runs now, if it is going to
        real_stop_group(self)
        finished.append(self.pgid)

    def interrupt(number, frame):
        raise Interrupted

    monkeypatch.setattr(VllmServer, "_stop_group", stop_group_signalled_midway)
    previous = signal.signal(signal.SIGTERM, interrupt)
    release = threading.Event()
    bystander = threading.Thread(target=release.wait)  # does not block any signal
    bystander.start()
    try:
        with pytest.raises(Interrupted):
            with VllmServer("model", [], log_path=stand_in / "log") as served:
                metrics_dir = served.metrics_dir
        assert finished == [served.pgid], "the stop was cut short"
        assert live_group_members(served.pgid) == []
        assert not os.path.exists(metrics_dir)
        assert signal.getsignal(signal.SIGTERM) is interrupt
    finally:
        signal.signal(signal.SIGTERM, previous)
        release.set()
        bystander.join()


def running(pid: int) -> bool:
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


class GoneStream:
    """stderr after the terminal closed, or a `| tee` killed by the same Ctrl-C."""

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_every_member_stops_one_ignoring_sigterm_too_with_stderr_gone(stand_in, monkeypatch):
    """The stop reaches the whole group, SIGKILLs what outlives the grace period, and a
    failing 'stopping ...' message does not skip it."""
    monkeypatch.setattr(server_module, "STOP_GRACE_S", 1)
    ignoring = stand_in / "ignoring_sigterm"
    env = {**os.environ, "STAND_IN_STUBBORN_CHILD": str(ignoring)}
    with pytest.raises(Interrupted):
        with VllmServer("model", [], log_path=stand_in / "log", env=env,
                        metrics=False) as served:
            deadline = time.monotonic() + 30
            while not ignoring.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            members = live_group_members(served.pgid)
            monkeypatch.setattr(sys, "stderr", GoneStream())
            raise Interrupted
    assert served.pgid in members and len(members) == 2, members
    assert not any(running(pid) for pid in members)


DRIVER = """
import os, signal, sys
from mole_serve.demo import server

server.vllm_executable = lambda: sys.argv[1]
stop_group = server.VllmServer._stop_group


def signalled_midway(self):
    os.kill(os.getpid(), signal.SIGTERM)  # default disposition: it ends this process
    stop_group(self)
    print("stopped", self.pgid, flush=True)


server.VllmServer._stop_group = signalled_midway
with server.VllmServer("model", [], log_path=server.pathlib.Path(sys.argv[2])) as served:
    print("metrics", served.metrics_dir, flush=True)
print("not reached", flush=True)
"""


def test_a_deadly_signal_while_stopping_ends_the_process_after_the_cleanup(stand_in):
    """Without a handler SIGTERM ends the process: only once the group is stopped and our
    metrics dir removed."""
    import subprocess

    done = subprocess.run([sys.executable, "-c", DRIVER, server_module.vllm_executable(),
                           str(stand_in / "log")], capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGTERM, done.stdout + done.stderr
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert "not reached" not in done.stdout
    assert live_group_members(int(lines["stopped"])) == []
    assert not os.path.exists(lines["metrics"])
