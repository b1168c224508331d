"""The HTML audit report in a real headless browser (Debian's chromium).

`audit verify --html` writes one self-contained page; here chromium loads
it from a file, renders it to a screenshot and dumps the DOM it built, and
the key facts are looked up in that DOM: the verdict, the deployment, the
custodians by name and fingerprint, the tenants, the anomalies. A name from
the log that looks like markup stays text in the rendered page.

`make test` installs chromium when it is missing and can be (root with
apt-get); otherwise these tests skip, saying so, unless
KEYQUORUM_REQUIRE_BROWSER=1 (CI), where a missing browser fails them.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from keyquorum.cli.audit import flip_one_byte, read_export
from keyquorum.cli.main import main as cli_main
from keyquorum.quorum.audit_html import render_html
from keyquorum.quorum.audit_report import audit
from tests.logfactory import EXPORT, LOG_KEY

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
REQUIRE_ENV = "KEYQUORUM_REQUIRE_BROWSER"


def _browser() -> str:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    reason = (
        "no headless browser (Debian: apt-get install -y chromium; `make test` installs it "
        "when run as root with apt-get)"
    )
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but {reason}")
    pytest.skip(reason)


def _run(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",  # tests run as root
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            f"--user-data-dir={profile}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _dom(browser: str, page: Path, tmp: Path) -> str:
    r = _run(browser, tmp / "profile-dom", "--dump-dom", page.as_uri())
    assert r.returncode == 0, r.stderr
    return r.stdout


def _screenshot(browser: str, page: Path, tmp: Path) -> tuple[int, int, int]:
    png = tmp / "report.png"
    r = _run(
        browser,
        tmp / "profile-shot",
        f"--screenshot={png}",
        "--window-size=1280,1600",
        "--hide-scrollbars",
        page.as_uri(),
    )
    assert r.returncode == 0, r.stderr
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height, len(data)


def test_the_html_report_renders_in_a_browser_with_its_key_facts(tmp_path: Path) -> None:
    browser = _browser()
    page = tmp_path / "report.html"
    r = CliRunner().invoke(
        cli_main, ["audit", "verify", str(EXPORT), "--log-key", LOG_KEY, "--html", str(page)]
    )
    assert r.exit_code == 0, r.output
    width, height, size = _screenshot(browser, page, tmp_path)
    assert (width, height) == (1280, 1600)
    assert size > 20_000  # a rendered page of tables, not a blank one
    dom = _dom(browser, page, tmp_path)
    assert 'id="verdict" class="verdict verified" data-verdict="verified"' in dom
    assert "keyquorum audit report: acme-prod" in dom
    assert "custodian 0 (XMDV-UEDF-EJMQ-4PJZ)" in dom
    assert "mallory (4YN5-GF22-244T-FV2I)" in dom
    assert "acme-health" in dom
    assert "other-clinic" in dom
    assert "Anomalies: 5" in dom
    # The refused proposal expired before the roster change: not "cancelled by" it.
    assert "cancelled by a roster change" not in dom.split('id="details"')[0]
    assert "custodian 0 (XMDV-UEDF-EJMQ-4PJZ) (signed by the proposer)" in dom


def test_a_failed_verification_renders_as_failed(tmp_path: Path) -> None:
    browser = _browser()
    tampered = tmp_path / "tampered.kqexport"
    seq = flip_one_byte(EXPORT, tampered)
    page = tmp_path / "failed.html"
    r = CliRunner().invoke(
        cli_main, ["audit", "verify", str(tampered), "--log-key", LOG_KEY, "--html", str(page)]
    )
    assert r.exit_code == 1
    dom = _dom(browser, page, tmp_path)
    assert 'data-verdict="failed"' in dom
    assert f"VERIFICATION FAILED: entry {seq}: damaged" in dom


def test_an_unpinned_report_is_not_shown_as_verified(tmp_path: Path) -> None:
    browser = _browser()
    page = tmp_path / "unpinned.html"
    r = CliRunner().invoke(cli_main, ["audit", "verify", str(EXPORT), "--html", str(page)])
    assert r.exit_code == 3
    dom = _dom(browser, page, tmp_path)
    assert 'data-verdict="unverified"' in dom
    assert "NOT VERIFIED" in dom


def test_markup_in_a_name_stays_text_in_the_browser(tmp_path: Path) -> None:
    browser = _browser()
    report = audit(read_export(EXPORT), log_key=LOG_KEY)
    evil = "<img src=x onerror=alert(1)><script>document.title='owned'</script>"
    first = report.summary.holders[0]
    holders = (
        dataclasses.replace(first, custodian=dataclasses.replace(first.custodian, name=evil)),
        *report.summary.holders[1:],
    )
    report = dataclasses.replace(
        report, summary=dataclasses.replace(report.summary, holders=holders)
    )
    page = tmp_path / "evil.html"
    page.write_text(render_html(report), encoding="utf-8")
    dom = _dom(browser, page, tmp_path)
    assert "<script" not in dom
    assert "<img" not in dom
    assert "owned" not in dom.split("</title>")[0]
    assert "&lt;img src=x onerror=alert" in dom
    assert "&lt;script&gt;document.title=" in dom
