"""Start `vllm serve` on localhost and stop it without leaving processes behind.

The server runs in its own process group (API server, engine core and workers all inherit
it), so one signal to the group stops them all, and a Ctrl-C in the terminal reaches only our
process, which then stops the server in order. If our process is killed outright, the kernel
sends the API server SIGTERM (Linux parent-death signal), which shuts down the rest.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx

STOP_GRACE_S = 30
KILL_WAIT_S = 5
PORT_ATTEMPTS = 3  # a port picked free may be taken before vllm serve binds it
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what --max-lora-rank accepts


class ServerError(RuntimeError):
    """`vllm serve` exited or never became healthy; the message ends with its log tail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_executable() -> str:
    """The `vllm` script next to this Python (the project venv), else the one on PATH."""
    beside = pathlib.Path(sys.executable).parent / "vllm"
    found = str(beside) if beside.exists() else shutil.which("vllm")
    if found is None:
        raise ServerError("no `vllm` executable next to this Python or on PATH: run `make setup`")
    return found


def default_env(cache_root: pathlib.Path | None) -> dict[str, str]:
    """Offline, CPU-friendly defaults; values already in the environment win."""
    defaults = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    if cache_root is not None:  # vLLM caches model inspection there: later starts are faster
        defaults["VLLM_CACHE_ROOT"] = str(cache_root)
    return {**defaults, **os.environ}


class VllmServer:
    """`with VllmServer(model, args, log_path=...) as server:` serves at `server.url`."""

    def __init__(self, model: str | pathlib.Path, serve_args: list[str], *,
                 log_path: pathlib.Path, env: dict[str, str] | None = None,
                 port: int | None = None, startup_timeout_s: float = 600,
                 metrics: bool = True):
        self.model, self.serve_args = str(model), list(serve_args)
        self.port_given = port is not None
        self._use_port(port or free_port())
        self.log_path = log_path
        self.env = dict(env if env is not None else default_env(None))
        self.startup_timeout_s = startup_timeout_s
        # Worker-side MoLE series reach /metrics only through such a dir; a user's is kept.
        self.makes_metrics_dir = metrics and "PROMETHEUS_MULTIPROC_DIR" not in self.env
        self.metrics_dir: str | None = None  # the one we made, removed at exit
        self.process: subprocess.Popen | None = None  # None once stopped
        self.pgid: int | None = None  # the server's process group (= the API server's pid)

    def _use_port(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.command = [vllm_executable(), "serve", self.model, "--host", "127.0.0.1",
                        "--port", str(port), *self.serve_args]

    def __enter__(self) -> "VllmServer":
        for attempt in range(1, PORT_ATTEMPTS + 1):
            try:
                self.start()
                self.wait_healthy()
                return self
            except BaseException as exc:
                self.__exit__()
                taken = isinstance(exc, ServerError) and "Address already in use" in \
                    self.log_tail()
                if self.port_given or not taken or attempt == PORT_ATTEMPTS:
                    raise
            self._use_port(free_port())

    def __exit__(self, *exc) -> None:
        """Stop the server and remove what we made; then raise a signal that came meanwhile
        (so a SIGTERM that kills the process still finds everything cleaned up)."""
        try:
            held = self.stop()
        finally:
            if self.metrics_dir:
                shutil.rmtree(self.metrics_dir, ignore_errors=True)
                self.metrics_dir = None
        if held is not None:
            signal.raise_signal(held)

    def start(self) -> None:
        if self.makes_metrics_dir:
            self.metrics_dir = tempfile.mkdtemp(prefix="mole_serve_prometheus_")
            self.env["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        elif any(pathlib.Path(self.env.get("PROMETHEUS_MULTIPROC_DIR", "")).glob("*.db")):
            print(f"note: PROMETHEUS_MULTIPROC_DIR={self.env['PROMETHEUS_MULTIPROC_DIR']} holds "
                  "an earlier run's metrics; their counts add to this run's", file=sys.stderr)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(self.command, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True,
                                            preexec_fn=_die_with_parent)
        self.pgid = self.process.pid

    def wait_healthy(self) -> None:
        """Poll /health until 200; raise ServerError with the log tail if the server exits
        or the timeout passes."""
        started = time.monotonic()
        with local_http() as client:
            while time.monotonic() - started < self.startup_timeout_s:
                if self.process.poll() is not None:
                    raise ServerError(f"vllm serve exited with {self.process.returncode}:\n"
                                      f"{self.log_tail()}")
                try:
                    if client.get(f"{self.url}/health", timeout=2).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(1)
        raise ServerError(f"vllm serve not healthy after {self.startup_timeout_s:.0f} s:\n"
                          f"{self.log_tail()}")

    def stop(self) -> int | None:
        """SIGTERM the whole group, wait for every member, SIGKILL what is left. A second
        Ctrl-C (or SIGTERM, SIGHUP) meanwhile must not cut this short and leave orphans: it is
        held, by Python-level handlers (they run in the main thread whichever thread the
        kernel hands the signal to; a signal mask holds it off one thread only), and its
        number returned for the caller to raise once done."""
        if self.process is None:
            return None
        held: list[int] = []
        previous = {}
        if threading.current_thread() is threading.main_thread():  # where handlers are set
            previous = {sig: signal.signal(sig, lambda number, _frame: held.append(number))
                        for sig in STOP_SIGNALS
                        if signal.getsignal(sig) is not None}  # None: set outside Python
        try:
            if self.process.poll() is None:
                with contextlib.suppress(OSError):  # stderr gone with the terminal or a pipe
                    print(f"stopping vllm serve (process group {self.pgid}) ...",
                          file=sys.stderr, flush=True)
            self._stop_group()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.process = None  # its pid may be reused: never signal that group again
        return held[0] if held else None

    def _stop_group(self) -> None:
        _signal_group(self.pgid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        try:
            self.process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        while live_group_members(self.pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if live_group_members(self.pgid):
            _signal_group(self.pgid, signal.SIGKILL)
            self.process.wait()
            deadline = time.monotonic() + KILL_WAIT_S  # SIGKILL is delivered, not awaited
            while live_group_members(self.pgid) and time.monotonic() < deadline:
                time.sleep(0.05)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def exit_on_termination() -> None:
    """SIGTERM / SIGHUP unwind like Ctrl-C (a SystemExit through every `with VllmServer`),
    so a killed script still stops its server's group and runs its cleanup."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda number, _frame: sys.exit(128 + number))


def local_http() -> httpx.Client:
    """A client for our own server on 127.0.0.1: proxy variables (http_proxy, ALL_PROXY)
    are for the outside world, and would send these requests to the proxy."""
    return httpx.Client(trust_env=False)


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest `--max-lora-rank` vLLM accepts that holds `rank`."""
    fitting = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not fitting:
        raise ValueError(f"rank {rank} is over vLLM's largest --max-lora-rank "
                         f"({VLLM_LORA_RANKS[-1]})")
    return fitting[0]


def live_group_members(pgid: int) -> list[int]:
    """Pids of the group that are still running (zombies excluded: a container's init may
    never reap them). Reads /proc on Linux; elsewhere asks the kernel about the group."""
    proc = pathlib.Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except ProcessLookupError:
            return []
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to SIGTERM it when our process dies."""
    if sys.platform.startswith("linux"):
        import ctypes
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
