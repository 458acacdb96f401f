"""The servers a cycle talks to go away: a real `mlflow server` and a real `prefect server` on 127.0.0.1
(`make trials`; a few minutes).

Each server is started by the test, stopped at a chosen stage of a real `redistill cycle` process (the
failpoint `REDISTILL_PAUSE_AT` holds the cycle there while the test stops it), then started again on the
same store, and the same command runs again. What a user relies on:
- down at start: one clear error line, exit non-zero, nothing distilled;
- down or failing (HTTP 5xx) during the cycle: bounded retries (`registry.retry_delays_s`), then one clear
  line naming the server; nothing registered; the distilled student kept under `runs/`;
- back again: the same command registers exactly one version without distilling again, and the first
  attempt's run is closed as FAILED with its reason.
The 5xx answers come from a small gateway in front of the real MLflow server (`Gateway` below): a real server
cannot be told to fail on demand; everything behind the gateway is the real server.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from helpers import LENIENT_GATE, TINY_CYCLE, tiny_trial_workspace, trial_env
from redistill.registry.client import PREFIX, client

pytestmark = pytest.mark.trials
NAME = "digits-student"
FAST_RETRIES = "registry: {retry_delays_s: [1, 2], http_retries: 1, http_timeout_s: 5}\n"


@pytest.fixture(scope="module")
def ws(digits_ws, tmp_path_factory):
    return tiny_trial_workspace(digits_ws, tmp_path_factory.mktemp("serversws"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert proc.poll() is None, f"the server exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not become healthy in {seconds} s")


class Server:
    """A real server process in its own process group, stopped with everything it spawned."""

    def __init__(self, cmd: list[str], health: str, env: dict | None = None, log: Path | None = None):
        self.cmd, self.health, self.env, self.log, self.proc = cmd, health, env, log, None

    def start(self) -> Server:
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            self.cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        wait_healthy(self.health, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass
        for _ in range(50):  # the group's children (uvicorn workers) go with it
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)


def mlflow_server(tmp: Path, port: int) -> Server:
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{tmp / 'mlflow.db'}",
        "--artifacts-destination",
        str(tmp / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    return Server(cmd, f"http://127.0.0.1:{port}/health", log=tmp / "mlflow-server.log")


def prefect_server(tmp: Path, port: int) -> Server:
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_UI_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    cmd = [
        str(Path(sys.executable).with_name("prefect")),
        "server",
        "start",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-ui",
    ]
    return Server(cmd, f"http://127.0.0.1:{port}/api/health", env=env, log=tmp / "prefect-server.log")


class Gateway:
    """A gateway in front of a real server that can be told to answer 503 or to be slow (mode)."""

    def __init__(self, upstream_port: int):
        gateway = self
        self.mode = "pass"

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _forward(self):
                if gateway.mode == "503":
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if gateway.mode == "slow":
                    time.sleep(30)
                body = self._body()
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in ("host", "connection", "transfer-encoding", "content-length")
                }
                headers["Content-Length"] = str(len(body))
                try:
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    r = conn.getresponse()
                    data = r.read()
                except OSError:  # the server behind is gone: what a gateway says then
                    self.send_response(502)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(r.status)
                for k, v in r.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            def _body(self) -> bytes:
                """The request body, as a proxy reads it: by Content-Length, or chunk by chunk (requests sends an
                empty file, such as a package's empty __init__.py among a model's code_paths, chunked)."""
                if "chunked" not in (self.headers.get("Transfer-Encoding") or "").lower():
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers, then the blank line
                            pass
                        return body
                    body += self.rfile.read(size)
                    self.rfile.readline()  # the CRLF after each chunk

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def params(ws: Path, seed: int) -> Path:
    f = ws / f"servers{seed}.yaml"
    f.write_text(
        TINY_CYCLE.replace("distill: {", f"distill: {{seed: {seed}, ")
        + "teacher: {name: tiny}\n"
        + LENIENT_GATE
        + FAST_RETRIES
    )
    return f


def cycle_cmd(ws: Path, p: Path) -> list[str]:
    return [sys.executable, "-m", "redistill", "cycle", "--workspace", str(ws), "--params", str(p), "--json"]


def run_paused(cmd: list[str], e: dict, stage: str, flag: Path, while_paused) -> subprocess.CompletedProcess:
    """Run the cycle, hold it at failpoint `stage`, call `while_paused()`, let it go on; its result."""
    flag.unlink(missing_ok=True)
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**e, "REDISTILL_PAUSE_AT": stage, "REDISTILL_PAUSE_FILE": str(flag)},
    )
    deadline = time.time() + 600
    while not flag.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert flag.exists(), f"the cycle did not reach {stage}: {proc.communicate()[1][-3000:]}"
    while_paused()
    flag.unlink()
    out, err = proc.communicate(timeout=900)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def summary_stamp(ws: Path) -> dict[str, int]:
    return {str(f): f.stat().st_mtime_ns for f in (ws / "runs" / "cycles").glob("*/student/redistill_distill.json")}


def rerun_registers_once_without_distilling(ws: Path, c, cmd: list[str], e: dict, stamps: dict) -> list:
    """Run the same command again with the server back: exactly one version for the key, the student not
    distilled again, the first attempt's run FAILED beside the new one FINISHED. The key's runs."""
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=e)
    assert again.returncode == 0, again.stderr[-3000:]
    out = json.loads(again.stdout.strip().splitlines()[-1])
    assert summary_stamp(ws) == stamps, "the student was distilled again"
    assert len(c.search_model_versions(f"name='{NAME}' and tags.`{PREFIX}key`='{out['key']}'")) == 1
    exp = c.get_experiment_by_name("redistill")
    runs = c.search_runs([exp.experiment_id], f"tags.`{PREFIX}key` = '{out['key']}'")
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"], [r.info.status for r in runs]
    return runs


def test_mlflow_server_down_at_start_stops_before_any_work(ws, tmp_path):
    p = params(ws, 101)
    before = summary_stamp(ws)
    r = subprocess.run(
        cycle_cmd(ws, p),
        capture_output=True,
        text=True,
        timeout=300,
        env=trial_env(MLFLOW_TRACKING_URI=f"http://127.0.0.1:{free_port()}"),
    )
    assert r.returncode == 2
    line = one_error_line(r.stderr)
    assert "cannot be reached" in line and "MLFLOW_TRACKING_URI" in line
    assert summary_stamp(ws) == before  # nothing distilled


@pytest.mark.long  # minutes of a server away and back: `make trials-long`
def test_a_gateway_answering_503_or_too_slowly_at_start_is_a_clear_error(ws, tmp_path):
    server = mlflow_server(tmp_path, free_port()).start()
    gw = Gateway(int(server.health.split(":")[2].split("/")[0]))
    try:
        for mode, needle in (("503", "503"), ("slow", "timed out")):
            gw.mode = mode
            r = subprocess.run(
                cycle_cmd(ws, params(ws, 102)),
                capture_output=True,
                text=True,
                timeout=300,
                env=trial_env(MLFLOW_TRACKING_URI=f"http://127.0.0.1:{gw.port}"),
            )
            assert r.returncode == 2, r.stderr[-2000:]
            line = one_error_line(r.stderr)
            assert "cannot be reached" in line and needle in line.lower(), line
    finally:
        gw.close()
        server.stop()


@pytest.mark.long  # minutes of a server away and back: `make trials-long`
@pytest.mark.parametrize("how", ["stopped", "503"])
def test_mlflow_server_gone_during_the_cycle_then_back(ws, tmp_path, how):
    port = free_port()
    server = mlflow_server(tmp_path, port).start()
    gw = Gateway(port)  # the 503 case goes through it; the stopped case talks to the server itself
    uri = f"http://127.0.0.1:{gw.port if how == '503' else port}"
    seed = 110 if how == "stopped" else 111
    p, flag = params(ws, seed), tmp_path / "paused"
    cmd, e = cycle_cmd(ws, p), trial_env(MLFLOW_TRACKING_URI=uri)
    try:

        def go_away():
            if how == "stopped":
                server.stop()
            else:
                gw.mode = "503"

        first = run_paused(cmd, e, "distilled", flag, go_away)
        assert first.returncode == 2, first.stderr[-3000:]
        line = one_error_line(first.stderr)
        assert "MLflow tracking server" in line and uri in line and "nothing was registered" in line, line
        assert ("does not answer" if how == "stopped" else "HTTP 503") in line, line
        assert "during the evaluate stage" in line, line  # the champion could not be read: not "no champion"
        assert "registers it without distilling again" in line, line
        stamps = summary_stamp(ws)
        assert stamps, "the distilled student was not kept under runs/"

        if how == "stopped":
            server.start()
        gw.mode = "pass"
        runs = rerun_registers_once_without_distilling(ws, client(uri), cmd, e, stamps)
        failed = next(r for r in runs if r.info.status == "FAILED")
        assert "recorded late" in failed.data.tags[PREFIX + "failure"]
        assert not (ws / "runs" / "cycles" / failed.data.tags[PREFIX + "key"] / "unrecorded-failure.json").exists()
    finally:
        gw.close()
        server.stop()


def test_prefect_api_down_at_start_stops_before_any_work(ws, tmp_path):
    before = summary_stamp(ws)
    gw = Gateway(free_port())
    gw.mode = "503"
    try:
        for url, needle in (
            (f"http://127.0.0.1:{free_port()}/api", "does not answer"),
            (f"http://127.0.0.1:{gw.port}/api", "503"),
        ):
            r = subprocess.run(
                cycle_cmd(ws, params(ws, 120)),
                capture_output=True,
                text=True,
                timeout=300,
                env=trial_env(PREFECT_API_URL=url),
            )
            assert r.returncode == 2, r.stderr[-2000:]
            line = one_error_line(r.stderr)
            assert "Prefect API" in line and url in line and needle in line and "prefect server start" in line, line
    finally:
        gw.close()
    assert summary_stamp(ws) == before


@pytest.mark.long  # minutes of a server away and back: `make trials-long`
def test_prefect_server_gone_during_the_cycle_then_back(ws, tmp_path):
    port = free_port()
    server = prefect_server(tmp_path, port).start()
    p, flag = params(ws, 130), tmp_path / "paused"
    e = trial_env(
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_CLIENT_MAX_RETRIES="1",
        PREFECT_HOME=str(tmp_path / "client-home"),
    )
    cmd = cycle_cmd(ws, p)
    c = client(f"sqlite:///{ws / 'mlflow.db'}")
    try:
        first = run_paused(cmd, e, "distilled", flag, server.stop)
        assert first.returncode == 2, first.stderr[-3000:]
        line = one_error_line(first.stderr)
        assert "Prefect API" in line and "nothing was registered" in line, line
        stamps = summary_stamp(ws)
        assert stamps
        server.start()
        rerun_registers_once_without_distilling(ws, c, cmd, e, stamps)
    finally:
        server.stop()
