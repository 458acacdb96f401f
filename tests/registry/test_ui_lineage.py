"""The lineage where auditors look: after a real cycle, a real `mlflow server` on 127.0.0.1 and a real headless
Chromium (Debian's `chromium`, driven by Playwright) open the registered version's page and its source run's page,
and find the lineage summary, the source run, the datasets (DVC md5 digests) and the logged models (the student,
with its metrics; the teacher, as the run's model input). Screenshots are kept under runs/test-artifacts/.

`.ci/run` installs `chromium`; Playwright comes with `make install` (the extra `browser`). The test is skipped,
saying why, only where one of them is missing (no package source to install from)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from helpers import LENIENT_GATE, REPO, TINY_CYCLE, tiny_trial_workspace, trial_env

CHROMIUM = "/usr/bin/chromium"
SHOTS = REPO / "runs" / "test-artifacts"
# as root Chromium needs --no-sandbox; the rest keep it from reaching for the closed network
ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def _missing() -> str | None:
    if not Path(CHROMIUM).is_file():
        return "Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "Playwright is not installed (pip install -e '.[browser]'; make install does)"
    return None


@pytest.mark.trials
@pytest.mark.long  # Chromium and Playwright: `make trials-long`
@pytest.mark.skipif(_missing() is not None, reason=_missing() or "")
def test_the_champions_lineage_is_on_its_mlflow_ui_pages(digits_ws):
    from playwright.sync_api import sync_playwright

    from redistill.ops.servers import free_port
    from redistill.registry.client import pid_alive

    root = Path(tempfile.mkdtemp(prefix="redistill-ui-"))
    tiny_trial_workspace(digits_ws, root)
    (root / "params.yaml").write_text(TINY_CYCLE + LENIENT_GATE + "teacher: {name: tiny}\n")
    env = trial_env(DVC_NO_ANALYTICS="1")
    r = subprocess.run(
        [sys.executable, "-m", "redistill", "cycle", "--json", "--workspace", str(root)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    decision = json.loads(r.stdout.strip().splitlines()[-1])
    assert decision["decision"] == "promoted"
    version = str(decision["version"])
    lineage = json.loads(
        subprocess.run(
            [sys.executable, "-m", "redistill", "lineage", "--alias", "champion", "--json", "--workspace", str(root)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
    )
    ml = lineage["mlflow"]
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    SHOTS.mkdir(parents=True, exist_ok=True)
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, server.stderr.read().decode()[-2000:]
                time.sleep(0.5)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 3200})
                page.set_default_timeout(90_000)
                run_id, model_id = lineage["run_id"], ml["logged_model_id"]
                # the registered version: its description is the lineage summary; its source run and source model
                page.goto(f"{base}{ml['ui']['version']}", wait_until="domcontentloaded")
                page.get_by_text("gate check").first.wait_for()
                page.locator(f"a[href*='{run_id}']").first.wait_for()  # "Source Run"
                page.locator(f"a[href*='{model_id}']").first.wait_for()  # "Source Model": the student's logged model
                text = page.inner_text("body")
                page.screenshot(path=str(SHOTS / "version-page.png"), full_page=True)
                assert lineage["teacher"]["sha256"][:16] in text  # the summary's teacher row
                assert lineage["data"]["md5"] in text  # the summary's data rows (DVC md5)
                assert "fid_gap" in text and "pass" in text and run_id in text  # its gate table and source run
                # the source run: the training set among its datasets (DVC md5 digest), and its logged models
                page.goto(f"{base}{ml['ui']['run']}", wait_until="domcontentloaded")
                page.get_by_text(f"data/reference (training) ({lineage['data']['md5']})").first.wait_for()
                page.get_by_text("Logged models").first.scroll_into_view_if_needed()
                page.get_by_text(ml["teacher_model"]["name"]).first.wait_for()  # the teacher, a model input
                page.screenshot(path=str(SHOTS / "run-page.png"), full_page=True)
                # the student's logged model: its metrics, measured on the evaluation set (DVC md5 digest)
                page.goto(f"{base}{ml['ui']['logged_model']}", wait_until="domcontentloaded")
                page.get_by_text("quality.fid").first.wait_for()
                page.get_by_text(f"data/reference (evaluation) (#{lineage['data']['md5']})").first.wait_for()
                page.locator(f"a[href*='/models/digits-student/versions/{version}']").first.wait_for()  # its version
                page.screenshot(path=str(SHOTS / "logged-model-page.png"), full_page=True)
            finally:
                browser.close()
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        import os
        import signal

        try:  # the server's own workers (uvicorn) are in its session
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(root, ignore_errors=True)
    assert not pid_alive(server.pid)
    print(f"screenshots: {', '.join(str(p) for p in sorted(SHOTS.glob('*.png')))}")
