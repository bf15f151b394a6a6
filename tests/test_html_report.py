"""The offline HTML report: self-contained, escaped, and rendered by a real headless browser (Debian's chromium)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_stats import synthetic_report

from opd_callback.report.html import SECTIONS, build_compare_html, build_html

INJECT = "<script>var e=document.createElement('div');e.id='pwned';document.body.appendChild(e);" \
         "document.title='pwned'</script>"
IMG = "<img src=x onerror=\"document.title='pwned-img'\">"
TITLE = "alignment report under test"


def malicious_report():
    rep = synthetic_report(n_questions=4, configs={"a": 0.0, "<i>b": 0.1})
    rep.meta["configs"] = [{"name": "a"}, {"name": "<i>b"}]
    rep.meta["student"] = '"><script>document.title="pwned-meta"</script>'
    rol = rep.rollouts
    rol["prompt"] = "What is 1+1? " + IMG + "</div>" + INJECT
    rol["completion"] = "answer " + INJECT
    rol["completion_tokens"] = [["<", "script", ">", INJECT, IMG, "\n", "&amp;"] for _ in range(len(rol))]
    rol["completion_ids"] = [[1, 2, 3, 4, 5, 6, 7] for _ in range(len(rol))]
    rep.records["candidate_tokens"] = [[INJECT, IMG] for _ in range(len(rep.records))]
    return rep


def test_page_is_self_contained_and_escaped(tmp_path):
    rep = malicious_report()
    page = build_html(rep, tmp_path / "r.html", title=TITLE)
    assert (tmp_path / "r.html").read_text(encoding="utf-8") == page
    assert page.count("<script>") == 1  # the page's own colour switcher, nothing injected
    assert "<img" not in page and "<i>b" not in page
    assert "&lt;script&gt;" in page and "&lt;img src=x onerror=" in page and "&lt;i&gt;b" in page
    assert "&amp;amp;" in page  # a token that looks like an entity is shown literally
    # nothing is loaded from elsewhere: no external src/href, no CSS imports or url()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page)
    assert "@import" not in page and "url(" not in page
    for sid in SECTIONS:
        assert f'id="{sid}"' in page
    assert page.count('class="tok node"') == len(rep.records.drop_duplicates(
        ["prompt_index", "rollout_index", "position"]).query("position < 7"))


def test_fallbacks_without_tokens_or_norms(tmp_path):
    rep = synthetic_report(n_questions=2)
    rep.records = rep.records.drop(columns=["g_norm", "d_norm"])  # records written before the norms existed
    page = rep.to_html(tmp_path / "old.html")
    assert "rerun the diagnostic" in page  # the oracle section says why it is empty
    assert "scored tokens:" in page  # no tokenizer and no token strings: completions as text + scored tokens
    rep.meta["interrupted"] = True
    rep.meta["completed_prompts"], rep.meta["total_prompts"] = 2, 5
    assert "This run was interrupted: 2 of 5 prompts" in build_html(rep)


def test_compare_page(tmp_path):
    a, b = synthetic_report(seed=0), synthetic_report(seed=1)
    page = build_compare_html(a, b, tmp_path / "c.html", names=("ckpt-100", "<ckpt-200>"))
    for sid in ("compare", "success", "windows", "summary-ckpt-100"):
        assert f'id="{sid}"' in page
    assert "&lt;ckpt-200&gt;" in page and "<ckpt-200>" not in page
    assert "<script>" not in page


# --------------------------------------------------------------------------------------------------------------------
# a real browser


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
                  "--disable-dev-shm-usage"]


def _find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium; installed with apt-get when missing (skipped, with the reason, where that is impossible)."""
    path = _find_chromium()
    if path:
        return path
    apt = shutil.which("apt-get")
    if apt is None:
        pytest.skip("chromium is not installed and there is no apt-get to install it "
                    "(Debian: apt-get install chromium)")
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        pytest.skip("chromium is not installed and installing it needs root (run: sudo apt-get install -y chromium)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    r = subprocess.run([apt, "install", "-y", "-q", "chromium"], env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        subprocess.run([apt, "update", "-q"], env=env, capture_output=True, text=True, timeout=600)
        r = subprocess.run([apt, "install", "-y", "-q", "chromium"], env=env, capture_output=True, text=True,
                           timeout=900)
    path = _find_chromium()
    if r.returncode != 0 or path is None:
        pytest.skip(f"apt-get install chromium failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    return path


def dump_dom(chromium: str, page: Path, tmp_path: Path) -> str:
    r = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}", "--dump-dom",
         page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_browser_renders_and_runs_no_injected_script(chromium, tmp_path):
    # control: this browser set-up does run inline scripts, so the check below is not vacuous
    control = tmp_path / "control.html"
    control.write_text(f"<html><head><title>before</title></head><body>{INJECT}</body></html>")
    dom = dump_dom(chromium, control, tmp_path)
    assert "<title>pwned</title>" in dom and 'id="pwned"' in dom

    page = tmp_path / "report.html"
    build_html(malicious_report(), page, title=TITLE)
    dom = dump_dom(chromium, page, tmp_path)
    assert f"<title>{TITLE}</title>" in dom  # no injected script changed the title
    assert 'id="pwned"' not in dom and "<img" not in dom
    assert "&lt;script&gt;" in dom  # the completion is shown as text
    for sid in SECTIONS:
        assert f'id="{sid}"' in dom
    assert dom.count("<svg") >= 6  # ranking, histograms, depth and success plots
    assert 'class="tok node"' in dom and 'class="tip"' in dom


def test_browser_screenshot_is_not_blank(chromium, tmp_path):
    page = tmp_path / "report.html"
    build_html(synthetic_report(n_questions=3), page)
    shot = tmp_path / "shot.png"
    r = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1000,900",
         f"--screenshot={shot}", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # a blank page compresses to a few KB
