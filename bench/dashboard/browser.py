"""Headless Chromium over the DevTools protocol, with nothing but the standard library.

Chromium's `--remote-debugging-pipe` speaks the protocol on file descriptors 3 (commands in)
and 4 (replies and events out), NUL-separated JSON, so no websocket client and no driver
package is needed, and nothing is downloaded: the browser is the system's (Debian's
`chromium`). Used by the dashboard's browser tests and by its page-weight and load-time
measurement (bench/dashboard/measure.py).
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM_ENV = "ISP_BENCH_CHROMIUM"  # a browser binary other than `chromium` on PATH
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
         "--remote-debugging-pipe")


LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:")  # inline or on this disk: no network


class BrowserError(RuntimeError):
    pass


def beyond_local(urls: list[str]) -> list[str]:
    """The requests that would leave the machine (anything not file://, data:, blob: or about:)."""
    return [u for u in urls if not u.startswith(LOCAL_SCHEMES)]


def find_chromium() -> str | None:
    """The browser to drive, or None (callers skip, saying why)."""
    wanted = os.environ.get(CHROMIUM_ENV)
    if wanted:
        return wanted if Path(wanted).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class PageLog:
    """What a page did: console errors, uncaught exceptions, every request's URL."""
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    loaded: bool = False


class Browser:
    """One headless Chromium with a fresh profile; `with Browser() as b: page = b.new_page()`."""

    def __init__(self, binary: str | None = None, timeout_s: float = 30.0) -> None:
        self.binary = binary or find_chromium()
        if self.binary is None:
            raise BrowserError(f"no chromium found (apt-get install chromium, or set {CHROMIUM_ENV})")
        self.timeout_s = timeout_s
        self._next_id = 0
        self._buffer = b""
        self._events: list[dict[str, Any]] = []

    def __enter__(self) -> Browser:
        self._profile = tempfile.mkdtemp(prefix="isp-bench-chromium-")
        to_child, self._out = os.pipe()  # we write commands, the browser reads fd 3
        self._in, from_child = os.pipe()  # the browser writes fd 4, we read

        def fds_3_and_4() -> None:  # dup first: a pipe end may already sit on 3 or 4
            a, b = os.dup(to_child), os.dup(from_child)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self._proc = subprocess.Popen([self.binary, *FLAGS, f"--user-data-dir={self._profile}", "about:blank"],
                                      preexec_fn=fds_3_and_4, close_fds=False, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child)
        os.close(from_child)
        try:
            self.call("Browser.getVersion")  # it started and speaks the protocol
        except BrowserError:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._send("Browser.close")
            self._proc.wait(timeout=10)
        except (OSError, BrowserError, subprocess.TimeoutExpired):
            self._proc.kill()
            self._proc.wait()
        finally:
            os.close(self._out)
            os.close(self._in)
            shutil.rmtree(self._profile, ignore_errors=True)

    def _send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> int:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        return self._next_id

    def _receive(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._in], [], [], left)[0]:
                raise BrowserError(f"chromium did not answer within {self.timeout_s:g}s")
            chunk = os.read(self._in, 1 << 20)
            if not chunk:
                raise BrowserError("chromium closed the DevTools pipe (it crashed or could not start)")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        """Send one command and wait for its reply; events that arrive meanwhile are kept."""
        wanted = self._send(method, params, session)
        deadline = time.monotonic() + self.timeout_s
        while True:
            message = self._receive(deadline)
            if message.get("id") == wanted:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error'].get('message')}")
                return message.get("result", {})
            self._events.append(message)

    def pump(self, seconds: float) -> None:
        """Collect events for a while (console messages arrive after the load event)."""
        deadline = time.monotonic() + seconds
        try:
            while True:
                self._events.append(self._receive(deadline))
        except BrowserError as exc:
            if "closed" in str(exc):
                raise

    def new_page(self, width: int = 1280, height: int = 900) -> Page:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session, target)
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", session=session)
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=session)
        return page

    def take_events(self, session: str) -> list[dict[str, Any]]:
        mine = [e for e in self._events if e.get("sessionId") == session]
        self._events = [e for e in self._events if e.get("sessionId") != session]
        return mine


class Page:
    def __init__(self, browser: Browser, session: str, target: str) -> None:
        self.browser = browser
        self.session = session
        self.target = target
        self.log = PageLog()

    def close(self) -> None:
        """Close the tab: a second open tab is hidden, and hidden tabs get no animation frames."""
        self.browser.call("Target.closeTarget", {"targetId": self.target})
        self.browser.take_events(self.session)

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.browser.call(method, params, self.session)

    def _absorb(self) -> None:
        for event in self.browser.take_events(self.session):
            _note(self.log, event.get("method", ""), event.get("params", {}))

    def goto(self, url: str, settle_s: float = 0.3) -> PageLog:
        """Navigate, wait for the load event, then a little for late console messages."""
        self.log = PageLog()
        self.call("Page.navigate", {"url": url})
        deadline = time.monotonic() + self.browser.timeout_s
        while not self.log.loaded:
            if time.monotonic() > deadline:
                raise BrowserError(f"{url}: no load event within {self.browser.timeout_s:g}s")
            self.browser.pump(0.05)
            self._absorb()
        self.browser.pump(settle_s)
        self._absorb()
        return self.log

    def evaluate(self, expression: str, await_promise: bool = False) -> Any:
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": await_promise})
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression[:60]}...: {_exception_text(result['exceptionDetails'])}")
        self._absorb()
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout_s: float | None = None) -> Any:
        """Poll a JavaScript expression until it is truthy; returns its value."""
        deadline = time.monotonic() + (timeout_s or self.browser.timeout_s)
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            self.browser.pump(0.05)
            self._absorb()
        raise BrowserError(f"timed out waiting for {expression!r}")

    def screenshot(self, path: Path, full_page: bool = True) -> Path:
        params: dict[str, Any] = {"format": "png", "captureBeyondViewport": full_page}
        if full_page:
            size = self.call("Page.getLayoutMetrics")["cssContentSize"]
            params["clip"] = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 16000),
                              "scale": 1}
        data = self.call("Page.captureScreenshot", params)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path


def _exception_text(details: dict[str, Any]) -> str:
    exc = details.get("exception") or {}
    return str(exc.get("description") or details.get("text") or "exception")


def _note(log: PageLog, method: str, params: dict[str, Any]) -> None:
    if method == "Page.loadEventFired":
        log.loaded = True
    elif method == "Network.requestWillBeSent":
        log.requests.append(params["request"]["url"])
    elif method == "Runtime.exceptionThrown":
        log.errors.append(_exception_text(params.get("exceptionDetails", {})))
    elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
        log.errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
    elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
        entry = params["entry"]
        log.errors.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}".strip())
