"""The documentation can be trusted: the site builds with `mkdocs build --strict` (no broken
link, no missing API reference), and every code block of the README and of docs/ either runs
here (resnetkit commands through the CLI, Python blocks as they are) or says why it cannot,
in a `<!-- not run: REASON -->` line just above it."""
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"^<!-- not run: (.+?) -->$")


def code_blocks(path: Path) -> list[dict]:
    """The fenced blocks of a Markdown file: language, text, line, and the reason it is not
    run (None: it runs)."""
    lines, out, i = path.read_text().splitlines(), [], 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = next((lines[k].strip() for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        reason = NOT_RUN.match(before)
        out.append({"lang": m.group(1), "text": "\n".join(lines[i + 1:end]), "line": i + 1,
                    "reason": reason.group(1) if reason else None, "page": path.name})
        i = end + 1
    return out


BLOCKS = [b for page in PAGES for b in code_blocks(page)]


def test_every_block_runs_or_says_why_not():
    assert len(BLOCKS) > 20
    unlabelled = [f"{b['page']}:{b['line']}" for b in BLOCKS if b["lang"] not in ("bash", "python", "text")]
    assert unlabelled == []  # a language says how to run it (text: not code)
    marked = [b for b in BLOCKS if b["reason"] is not None]
    assert all(len(b["reason"]) > 15 for b in marked)  # a reason, not a placeholder
    assert any(b["reason"] is None and b["lang"] == "bash" for b in BLOCKS)


RUN = [b for b in BLOCKS if b["reason"] is None and b["lang"] in ("bash", "python")]


@pytest.mark.parametrize("block", RUN, ids=[f"{b['page']}:{b['line']}" for b in RUN])
def test_block_runs(block, tmp_path, monkeypatch, capsys):
    """A runnable bash block is resnetkit commands (run through the CLI in an empty folder,
    each must exit 0); a Python block runs as it is."""
    from resnetkit.cli import main
    monkeypatch.chdir(tmp_path)
    if block["lang"] == "python":
        exec(compile(block["text"], f"{block['page']}:{block['line']}", "exec"), {})
        return
    for line in block["text"].splitlines():
        args = shlex.split(line, comments=True)
        if not args:
            continue
        assert args[0] == "resnetkit", f"{block['page']}:{block['line']}: {line}"
        assert main(args[1:]) == 0, (line, capsys.readouterr())


def test_the_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs", reason="pip install 'resnetkit[docs]'")
    pytest.importorskip("mkdocstrings")
    pytest.importorskip("mkdocs_jupyter")
    env = {**os.environ, "DOCS_EXECUTE": "false", "NO_MKDOCS_2_WARNING": "1"}
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f",
                        str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
                       capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    site = tmp_path / "site"
    for page in ("index.html", "api.html", "tutorial.html", "serving.html",
                 "degradation/index.html", "contributing.html"):
        assert (site / page).is_file(), page
    api = (site / "api.html").read_text()
    # the reference is built from the docstrings, not written by hand
    assert "Grad-CAM (Selvaraju et al. 2017)" in api and "ServeConfig" in api
    assert (site / "degradation" / "degradation.png").is_file()
    browse(site)


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)


def browse(site: Path) -> None:
    """The built site in a real headless Chromium: the front page's navigation leads to the
    API reference, whose entries are rendered from the docstrings, and the figure loads."""
    if CHROMIUM is None:
        return  # the build itself is checked; the page test of serve says how to get chromium
    sync = pytest.importorskip("playwright.sync_api").sync_playwright
    import tempfile
    with sync() as p, tempfile.TemporaryDirectory() as profile:
        browser = p.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--allow-file-access-from-files"])
        try:
            page = browser.new_page()
            page.goto((site / "index.html").as_uri())
            assert page.title() == "resnetkit" and "Get started" in page.inner_text("article")
            page.click("nav >> text=API reference")
            page.wait_for_url("**/api.html")
            assert page.locator("[id='resnetkit.explain.attributions.grad_cam']").count() == 1
            assert "Selvaraju" in page.inner_text("article")
            page.goto((site / "degradation" / "index.html").as_uri())
            width = page.evaluate("Array.from(document.images).filter(i => i.src.endsWith("
                                  "'degradation.png'))[0].naturalWidth")
            assert width > 500
        finally:
            browser.close()


def test_the_readme_is_short_and_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    head = text.split("## ", 2)[1]
    assert head.startswith("Two commands") and "make demo" in head and "make test" in head
    for link in re.findall(r"\]\(((?:docs/)[^)#]+)\)", text):
        assert (ROOT / link).exists(), link
