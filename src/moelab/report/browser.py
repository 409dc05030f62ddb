"""Open a report in headless Chromium: did every image decode, was anything logged to the console?

Uses Debian's ``chromium`` (``apt-get install chromium``) as a command: ``--dump-dom`` returns the page
after its load event, where the report's inline script has written ``data-images="decoded/total"``
on ``<body>``; ``--enable-logging=stderr`` prints every console message (errors, uncaught exceptions,
failed loads) as a ``CONSOLE`` line. A report logs nothing, so any such line is a failure. A second
run writes a PNG screenshot. The browser gets a fresh profile folder and no network use of its own.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from moelab.errors import MoelabError

_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
          "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
          "--disable-default-apps", "--disable-extensions"]
_CONSOLE = re.compile(r":CONSOLE[:(]\d*\)?\]? ?(.*)")


@dataclass(frozen=True)
class PageCheck:
    """What the browser saw: images decoded out of the total, console messages, the screenshot."""

    images_ok: int
    images_total: int
    console: list[str]
    screenshot: Path | None

    @property
    def ok(self) -> bool:
        return self.images_ok == self.images_total and not self.console


def chromium_path() -> str | None:
    """The Chromium executable on PATH (``chromium``, ``chromium-browser``), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    exe = chromium_path()
    if exe is None:
        raise MoelabError("chromium: no Chromium on PATH; install it with `apt-get install chromium`")
    with tempfile.TemporaryDirectory(prefix="moelab-chromium-") as profile:
        try:
            return subprocess.run([exe, *_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                                  text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise MoelabError(f"chromium: no answer within {timeout:g} s for {args[-1]}") from None


def check_page(page: str | Path, screenshot: str | Path | None = None, width: int = 1200,
               height: int = 3000, timeout: float = 120.0) -> PageCheck:
    """Load ``page`` (an HTML file) in headless Chromium; optionally save a ``width x height``
    screenshot of its top to ``screenshot`` (PNG)."""
    path = Path(page).resolve()
    if not path.is_file():
        raise MoelabError(f"check_page: {path} is not a file")
    url = path.as_uri()
    res = _run(["--enable-logging=stderr", "--v=0", "--dump-dom", url], timeout)
    found = re.search(r'<body[^>]*\bdata-images="(\d+)/(\d+)"', res.stdout)
    if found is None:
        raise MoelabError(f"check_page: {path} did not report its images (no data-images on <body>; "
                          f"chromium exit {res.returncode}: {res.stderr.strip()[-300:]})")
    console = [m.group(1).strip() for line in res.stderr.splitlines() if (m := _CONSOLE.search(line))]
    shot = None
    if screenshot is not None:
        shot = Path(screenshot).resolve()
        _run([f"--screenshot={shot}", f"--window-size={width},{height}", url], timeout)
        if not shot.is_file():
            raise MoelabError(f"check_page: chromium wrote no screenshot to {shot}")
    return PageCheck(int(found.group(1)), int(found.group(2)), console, shot)
