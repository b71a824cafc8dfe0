"""HTML -> PDF with a headless Chromium driven by Playwright: the browser the reports are checked
in is the one that prints them, so the PDF looks like the page. Chromium comes from the system
(Debian's `chromium`), or `FUSION_CHROMIUM`, or Playwright's own download when present."""

from __future__ import annotations

import html as html_lib
import os
import re
import shutil
from pathlib import Path

from fusion.errors import FusionError
from fusion.storage import atomic_path

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
PAGE_MARGIN = {"top": "14mm", "bottom": "14mm", "left": "12mm", "right": "12mm"}  # room for header and footer


def chromium_path() -> str | None:
    """The Chromium to drive: $FUSION_CHROMIUM, else the first of chromium / chromium-browser /
    google-chrome on PATH; None lets Playwright use a browser it downloaded itself."""
    if os.environ.get("FUSION_CHROMIUM"):
        return os.environ["FUSION_CHROMIUM"]
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def launch(playwright):
    try:
        return playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
    except Exception as e:
        raise FusionError(f"cannot start Chromium to print PDFs ({e}). Install it (Debian: `apt-get install "
                          "chromium`) or set FUSION_CHROMIUM; `--no-pdf` writes the HTML reports alone.") from e


def header_text(html_file: Path) -> str:
    """The `<meta name="fusion-header">` of a report (printed at the top of every PDF page), or ''."""
    found = re.search(r'<meta name="fusion-header" content="([^"]*)"', Path(html_file).read_text(errors="replace"))
    return found.group(1) if found else ""


def print_pdfs(html_files: list[Path]) -> list[Path]:
    """Print each HTML file to A4 PDF beside it (same name, .pdf); one browser for all of them.
    A report's header (its patient id) and the page number are printed on every page."""
    from playwright.sync_api import sync_playwright

    written = []
    with sync_playwright() as p:
        browser = launch(p)
        try:
            page = browser.new_page()
            for html in html_files:
                page.goto(Path(html).resolve().as_uri(), wait_until="load")
                pdf = Path(html).with_suffix(".pdf")
                header = html_lib.escape(header_text(Path(html)))
                with atomic_path(pdf) as tmp:
                    page.pdf(path=str(tmp), format="A4", print_background=True, prefer_css_page_size=True,
                             display_header_footer=bool(header), margin=PAGE_MARGIN,
                             header_template=f'<div style="font-size:7pt;width:100%;padding:0 12mm;color:#555">'
                                             f"{header}</div>",
                             footer_template='<div style="font-size:7pt;width:100%;padding:0 12mm;color:#555;'
                                             'text-align:right">page <span class="pageNumber"></span> of '
                                             '<span class="totalPages"></span></div>')
                written.append(pdf)
        finally:
            browser.close()
    return written
