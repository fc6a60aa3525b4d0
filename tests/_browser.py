"""Rendering the HTML pages of `backdoorlab report` in headless Chromium, and reading their tables
(shared by test_report.py and test_leaderboard.py; pyproject puts tests/ on the path)."""

from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI (.ci/run installs it)")
        pytest.skip("chromium is not installed: the HTML report is checked in a headless browser")
    return exe


def _run(page: Path, tmp_path: Path, args: list[str], width: int | None, height: int, fragment: str):
    size = [f"--window-size={width},{height}"] if width else []
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           *size, f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=5000", *args,
           page.resolve().as_uri() + fragment]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out


def render(page: Path, tmp_path: Path, width: int | None = None, fragment: str = "") -> str:
    """The DOM of ``page`` (``fragment``: ``#...`` appended to its URL) after its scripts ran."""
    return _run(page, tmp_path, ["--dump-dom"], width, 1000, fragment).stdout


def screenshot(page: Path, tmp_path: Path, width: int = 1400, height: int = 1000, fragment: str = "") -> Path:
    """A PNG screenshot of ``page`` in a ``width`` x ``height`` window."""
    out = tmp_path / f"{page.stem}-screenshot.png"
    _run(page, tmp_path, ["--hide-scrollbars", f"--screenshot={out}"], width, height, fragment)
    assert out.is_file() and out.stat().st_size > 0
    return out


class Cells(HTMLParser):
    """The cells of every ``<table>`` of a page: ``[(table attrs, [[(text, cell attrs), ...], ...]), ...]``."""

    def __init__(self):
        super().__init__()
        self.tables, self._cell, self._attrs = [], None, {}

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append((dict(attrs), []))
        elif tag == "tr" and self.tables:
            self.tables[-1][1].append([])
        elif tag in ("td", "th") and self.tables:
            self._cell, self._attrs = [], dict(attrs)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][1][-1].append(("".join(self._cell), self._attrs))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse_tables(page: str) -> list[tuple[dict, list[list[tuple[str, dict]]]]]:
    p = Cells()
    p.feed(page)
    return p.tables


def tables(page: str, cls: str | None = None) -> list[list[list[str]]]:
    """The text of every cell of the tables of class ``cls`` (all tables if ``None``)."""
    return [[[text for text, _ in row] for row in rows] for attrs, rows in parse_tables(page)
            if cls is None or attrs.get("class", "") == cls]


def table_by_id(page: str, table_id: str) -> list[list[tuple[str, dict]]]:
    """The rows of the table ``id=table_id``: each a list of ``(text, attrs)`` cells."""
    found = [rows for attrs, rows in parse_tables(page) if attrs.get("id") == table_id]
    assert len(found) == 1, f"{len(found)} tables with id {table_id}"
    return found[0]
