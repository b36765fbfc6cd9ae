"""The report in a real browser: headless Chromium opens a report built from a finished tiny grid, with
networking disabled, and every chart must render without a Vega error.

The grid trains in this process (three runs of a few seconds, int8 quantisation included) and plants
one failed run, so the page shows a study whose only run failed, as in a partial report. Chromium is
Debian's `chromium` (`scripts/ci-setup-chromium.sh` installs it; `.ci/run` calls that script); without
it the tests skip, saying so, except under CI=true, where they fail. The screenshot is kept as a test
artifact in reports/test-artifacts/browser.png (git-ignored).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import urllib.parse
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.helpers.services import require_service

pytestmark = pytest.mark.slow  # starts processes: a finished tiny grid and headless Chromium

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACT = REPO / "reports" / "test-artifacts" / "browser.png"

GRID_CONFIG = {
    "quant": {"bits": [8, 4], "calib_batches": 2, "eval_batches": 2},
    "defaults": {
        "block": "pre_ln", "scale": "tiny", "optimizer": "adamw", "lr": 1.0e-2, "seed": 0,
        "model": {"n_layer": 2, "d_model": 32, "n_head": 2, "context": 32},
        "train": {"steps": 12, "batch_size": 4, "log_every": 4, "eval_every": 6, "eval_batches": 2,
                  "checkpoint_every": 12, "threads": 1},
    },
    "studies": {
        "norms": {"title": "Norms", "question": "Does OP stay near kurtosis 1?", "grid": {"block": ["pre_ln", "op"]}},
        "lr": {"title": "Learning rate", "question": "Does a higher LR raise kurtosis?",
               "grid": {"block": ["op"], "lr": [3.0e-3, 1.0e-2]}},
        "post": {"title": "Post-LN", "question": "(its only run fails)", "grid": {"block": ["post_ln"]}},
    },
}
FAILED_BLOCK = "post_ln"


def chromium(*args: str, user_data: Path) -> subprocess.CompletedProcess:
    """Headless Chromium with every network request sent to a closed port (file:// still loads)."""
    cmd = [
        CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-default-apps", "--disable-extensions", f"--user-data-dir={user_data}",
        "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>", "--virtual-time-budget=15000",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


class ChartScan(HTMLParser):
    """Per chart div (`<div class="chart" id="fig-...">`): whether it holds an <svg> (or <canvas>) with
    child elements, and its text (where the page's loader writes a vegaEmbed error)."""

    def __init__(self) -> None:
        super().__init__()
        self.charts: dict[str, dict] = {}
        self._open: list[tuple[str, str | None]] = []  # (tag, chart id it opened, if any)
        self._chart: str | None = None
        self._svg_depth: int | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attrs = dict(attrs)
        opened = None
        if tag == "div" and self._chart is None and "chart" in (attrs.get("class") or "").split():
            opened = self._chart = attrs.get("id") or f"anonymous-{len(self.charts)}"
            self.charts[opened] = {"drawn": False, "text": ""}
        elif self._chart is not None:
            if tag in ("svg", "canvas") and self._svg_depth is None:
                self._svg_depth = len(self._open)
                if tag == "canvas":
                    self.charts[self._chart]["drawn"] = True
            elif self._svg_depth is not None and len(self._open) > self._svg_depth:
                self.charts[self._chart]["drawn"] = True  # an element inside the svg
        if tag not in ("br", "img", "input", "meta", "link", "hr", "source", "wbr"):
            self._open.append((tag, opened))

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            open_tag, opened = self._open.pop()
            if self._svg_depth is not None and len(self._open) <= self._svg_depth:
                self._svg_depth = None
            if opened is not None:
                self._chart = None
            if open_tag == tag:
                break

    def handle_data(self, data: str) -> None:
        if self._chart is not None and self._svg_depth is None:
            self.charts[self._chart]["text"] += data


@pytest.fixture(scope="module")
def report(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny grid (three trained and quantised runs, one failed run) and its report."""
    from ofe.aggregate.runs import aggregate
    from ofe.config import QuantConfig
    from ofe.config import RunConfig
    from ofe.plan import plan_from_config
    from ofe.report.page import build_report
    from ofe.train.quantise import quantise_run
    from ofe.train.trainer import train

    root = tmp_path_factory.mktemp("grid")
    results = root / "results"
    plan = plan_from_config(GRID_CONFIG, REPO / "workflow" / "schemas" / "config.schema.yaml", root / "data")
    quant = QuantConfig(**GRID_CONFIG["quant"])
    for run in plan["runs"]:
        run_dir = results / "runs" / run["run_id"]
        if run["grid"]["block"] == FAILED_BLOCK:
            run_dir.mkdir(parents=True)
            (run_dir / "error.txt").write_text("Traceback (most recent call last):\nRuntimeError: planted failure\n")
            continue
        train(replace(RunConfig.from_dict(run["config"]), data_dir=str(data_dir)), run_dir)
        quantise_run(run_dir, quant)
    aggregate(plan, results)
    # PNG export is covered in tests/unit/report/test_report.py; SVG only here keeps the fixture quick.
    return build_report(results, root / "reports" / "index.html", png=False)


@pytest.fixture(scope="module")
def browser() -> str:
    require_service(CHROMIUM is not None, "headless Chromium (`chromium`)",
                    "install it with `sudo bash scripts/ci-setup-chromium.sh` (Debian's chromium package)")
    return CHROMIUM


def test_every_chart_renders_offline_without_errors(report: Path, browser: str, tmp_path: Path) -> None:
    page = report.read_text()
    expected = re.findall(r'<div class="chart" id="([^"]+)">', page)
    assert len(expected) >= 15  # 3 studies x 5 figures, the lr sweep, 2 int8 scatters

    start = time.monotonic()
    out = chromium("--enable-logging=stderr", "--v=0", "--dump-dom", report.resolve().as_uri(),
                   user_data=tmp_path / "profile-dom")
    assert out.returncode == 0, out.stderr[-3000:]
    scan = ChartScan()
    scan.feed(out.stdout)
    assert sorted(scan.charts) == sorted(expected), "chart divs in the rendered page differ from the source"
    failed = {cid: c["text"].strip()[:300] for cid, c in scan.charts.items() if "failed to render" in c["text"]}
    assert not failed, f"vegaEmbed errors: {failed}"
    blank = [cid for cid, c in scan.charts.items() if not c["drawn"]]
    assert not blank, f"{len(blank)} of {len(expected)} charts have an empty svg/canvas: {blank}"

    console = [line for line in out.stderr.splitlines() if "CONSOLE" in line]
    errors = [line for line in console if "Uncaught" in line or "Error" in line or "error" in line]
    assert not errors, "console errors:\n" + "\n".join(errors)

    shot = chromium(f"--screenshot={tmp_path / 'browser.png'}", "--window-size=1300,4000",
                    report.resolve().as_uri(), user_data=tmp_path / "profile-shot")
    assert shot.returncode == 0, shot.stderr[-3000:]
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tmp_path / "browser.png", ARTIFACT)
    assert ARTIFACT.stat().st_size > 20_000  # a blank page is a few kB
    print(f"\nbrowser: {len(expected)} charts rendered in {time.monotonic() - start:.1f} s; screenshot: {ARTIFACT}")
    for line in console:
        print("console:", line.split("CONSOLE", 1)[1][:200])


def test_every_link_of_the_page_resolves(report: Path) -> None:
    """Figure downloads and run folders are relative links that work from a file:// URL."""
    page = report.read_text()
    hrefs = [urllib.parse.unquote(h) for h in re.findall(r'href="([^"#][^"]*)"', page)]
    assert any(h.endswith(".svg") for h in hrefs) and any("/runs/" in h for h in hrefs)
    missing = [h for h in hrefs if not (report.parent / h).exists()]
    assert not missing, missing
    assert all(not h.startswith(("/", "file:", "http")) for h in hrefs)
    assert "RuntimeError: planted failure" in page and "Partial results" in page
