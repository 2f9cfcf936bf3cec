"""What a user sees in the MLflow UI, checked in a real headless browser (Debian's chromium driven by Playwright):
`fedlora ui` over a run from this test opens on the classic training view, and the run page shows the run's
accuracy chart, its logged model, its datasets, its system metrics and its figures. Screenshots of each page go
to the test's folder (and to $FEDLORA_SCREENSHOTS when set)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import TINY, config

pytestmark = pytest.mark.integration


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("no chromium on PATH: the browser test needs Debian's chromium (`apt-get install chromium`; "
                    ".ci/run installs it)")
    return path


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    from fedlora.lifecycle import run_inprocess

    root = tmp_path_factory.mktemp("ui-runs")
    cfg = config(*[o for o in TINY if not o.startswith(("tracking=", "privacy="))], f"runs_root={root}",
                 "tracking=mlflow", "privacy=dp", "privacy.epsilon=50", "clients.per_round=4")
    summary = run_inprocess(cfg, root / "run", echo=lambda *_: None)
    port = _port()
    proc = subprocess.Popen([sys.executable, "-m", "fedlora.cli", "ui", "--runs-root", str(root), "--port",
                             str(port)], stdout=open(root / "ui.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=5)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() - t0 < 180, (root / "ui.log").read_text()[-3000:]
                time.sleep(1)
        yield url, summary, root
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def _text(page) -> str:
    return page.inner_text("body")


def _wait_for(page, *needles: str, timeout_s: float = 60) -> str:
    t0 = time.monotonic()
    while True:
        text = _text(page)
        if all(n in text for n in needles):
            return text
        if time.monotonic() - t0 > timeout_s:
            missing = [n for n in needles if n not in text]
            if os.environ.get("FEDLORA_SCREENSHOTS"):
                page.screenshot(path=os.path.join(os.environ["FEDLORA_SCREENSHOTS"], "failed.png"), full_page=True)
                Path(os.environ["FEDLORA_SCREENSHOTS"], "failed.txt").write_text(text)
            raise AssertionError(f"{missing} not on {page.url} within {timeout_s}s; the page says:\n{text[:3000]}")
        time.sleep(1)


def test_run_page_shows_accuracy_model_datasets_and_figures(ui, tmp_path):
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import sync_playwright

    url, summary, root = ui
    run_id = summary["mlflow"]["run_id"]
    exp_id = MlflowClient(tracking_uri=summary["mlflow"]["tracking_uri"]).get_run(run_id).info.experiment_id
    shots = [tmp_path]
    if os.environ.get("FEDLORA_SCREENSHOTS"):
        shots.append(Path(os.environ["FEDLORA_SCREENSHOTS"]))
        shots[-1].mkdir(parents=True, exist_ok=True)

    def shot(page, name: str) -> None:
        for d in shots:
            page.screenshot(path=str(d / f"{name}.png"), full_page=True)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        # the experiment's link `fedlora ui` prints opens on its runs in the classic training view, not GenAI's
        line = next(ln for ln in (root / "ui.log").read_text().splitlines() if ln.strip().startswith("experiment "))
        assert line.strip().startswith("experiment fedlora: ") and f"/#/experiments/{exp_id}/runs?" in line
        page.goto(line.split(": ", 1)[1].strip())
        text = _wait_for(page, "Run Name", "Model training", "run")
        assert "Token Usage" not in text and "/runs" in page.url, page.url  # GenAI's overview would show tokens
        shot(page, "experiment-runs")
        page.goto(f"{url}/#/experiments/{exp_id}/runs/{run_id}")
        text = _wait_for(page, "Logged models (1)", "Ready", "rt_polarity-test", "Datasets")
        assert "global/accuracy" in text and "system/cpu_utilization_percentage" in text  # the overview's tables
        assert "fedlora federation: fedsvd on rt_polarity" in text and "fedlora run" in text  # description, source
        shot(page, "run-overview")
        page.get_by_text("+1", exact=True).first.click()  # the second dataset sits behind "+1"
        _wait_for(page, "rt_polarity-train")
        page.goto(f"{url}/#/experiments/{exp_id}/runs/{run_id}/model-metrics")
        _wait_for(page, "Model metrics", "bytes")
        page.get_by_placeholder("Search metric charts").fill("global/accuracy")
        _wait_for(page, "run (global/accuracy)")  # the accuracy chart's legend
        shot(page, "run-model-metrics")
        page.get_by_placeholder("Search metric charts").fill("epsilon")
        _wait_for(page, "run (epsilon/max)")
        page.goto(f"{url}/#/experiments/{exp_id}/runs/{run_id}/system-metrics")
        _wait_for(page, "system/cpu_utilization_percentage")
        shot(page, "run-system-metrics")
        page.goto(f"{url}/#/experiments/{exp_id}/runs/{run_id}/artifacts")
        _wait_for(page, "figures", "adapter", "clients.json")
        page.get_by_text("figures", exact=True).first.click()
        _wait_for(page, "rounds.png")
        shot(page, "run-artifacts")
        browser.close()
