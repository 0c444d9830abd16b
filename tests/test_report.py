"""Tests of ``sagevideo.video_io`` (mp4 / gif / PNG folders) and ``sagevideo.report`` (the fidelity report folder),
including a headless-browser check of ``report.html``.

Browser tests need a Chromium binary (Debian package ``chromium``; override with ``$SAGEVIDEO_CHROMIUM``) and
are skipped, with that reason, when none is found.
"""

from __future__ import annotations

import base64
import fcntl
import json
import math
import os
import queue
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sagevideo.metrics import video_lpips, video_psnr, video_ssim
from sagevideo.report import DIFF_GAIN, SCHEMA, load_metrics, write_report
from sagevideo.video_io import (
    UnsupportedFormatError,
    VideoWriteError,
    read_frames,
    read_video,
    write_frames,
    write_video,
)

T, H, W = 4, 64, 64


def make_video(t: int = T, h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    """Smooth, colourful, moving content (compresses well, so H.264 round trips stay close)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    frames = []
    for i in range(t):
        r = 128 + 100 * np.sin(x / 10.0 + i * 0.5)
        g = 30 + 190 * (y / max(1, h - 1))
        b = 120 + 90 * np.cos((x - y) / 14.0 - i * 0.4)
        img = np.stack([r, g, b], -1)
        img[10 + 2 * i:26 + 2 * i, 30:46] = (250, 220, 30)
        frames.append(img)
    return np.clip(np.rint(np.stack(frames)), 0, 255).astype(np.uint8)


def distort(video: np.ndarray, seed: int = 1) -> np.ndarray:
    """A stand-in for the accelerated video: noise that grows over the frames, frame 0 left identical."""
    rng = np.random.default_rng(seed)
    sig = np.arange(video.shape[0], dtype=np.float64)[:, None, None, None] * 3.0
    return np.clip(np.rint(video + rng.normal(0, 1, video.shape) * sig), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ video I/O


def test_mp4_round_trip(tmp_path):
    v = make_video()
    p = write_video(tmp_path / "sub" / "v.mp4", v, fps=8)
    assert p.is_file() and p.stat().st_size > 0
    r = read_video(p)
    assert r.shape == v.shape and r.dtype == np.uint8
    # Lossy (crf 18, 4:2:0 chroma) but close on smooth content.
    assert video_psnr(v, r).mean > 30


def test_mp4_odd_size_is_padded_not_resized(tmp_path):
    v = make_video(t=3, h=33, w=47)
    r = read_video(write_video(tmp_path / "odd.mp4", v, fps=8))
    assert r.shape == (3, 34, 48, 3)
    assert video_psnr(v, r[:, :33, :47]).mean > 30  # same geometry: padding, not a rescale


def test_gif_round_trip(tmp_path):
    v = make_video(t=3)
    r = read_video(write_video(tmp_path / "v.gif", torch.from_numpy(v), fps=5))
    assert r.shape == v.shape and r.dtype == np.uint8
    assert video_psnr(v, r).mean > 25  # palette quantisation


def test_png_folder_round_trip_is_lossless(tmp_path):
    v = make_video()
    paths = write_frames(tmp_path / "frames", v)
    assert [p.name for p in paths] == [f"frame_{i:05d}.png" for i in range(T)]
    np.testing.assert_array_equal(read_frames(tmp_path / "frames"), v)
    # Float input in [0, 1] is rounded to the same bytes.
    write_frames(tmp_path / "f2", v.astype(np.float32) / 255)
    np.testing.assert_array_equal(read_frames(tmp_path / "f2"), v)


def test_video_io_errors(tmp_path):
    v = make_video(t=2)
    for bad in ("v.avi", "v.webm", "v"):
        with pytest.raises(UnsupportedFormatError, match="unsupported video extension"):
            write_video(tmp_path / bad, v)
        with pytest.raises(UnsupportedFormatError):
            read_video(tmp_path / bad)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(VideoWriteError, match="cannot create output folder"):
        write_video(blocker / "v.mp4", v)
    with pytest.raises(VideoWriteError):
        write_frames(blocker / "frames", v)
    with pytest.raises(VideoWriteError):
        write_report(blocker / "report", v, v)
    with pytest.raises(FileNotFoundError):
        read_video(tmp_path / "missing.mp4")
    with pytest.raises(FileNotFoundError):
        read_frames(tmp_path)  # exists, but holds no frame_*.png
    with pytest.raises(ValueError, match="fps"):
        write_video(tmp_path / "v.mp4", v, fps=0)
    with pytest.raises(ValueError, match="4 dimensions"):
        write_video(tmp_path / "v.mp4", v[0])


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores folder permissions")
def test_unwritable_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(VideoWriteError, match="not writable"):
            write_video(ro / "v.mp4", make_video(t=2))
    finally:
        ro.chmod(0o700)


def test_unwritable_folder_detected_by_write_probe(tmp_path, monkeypatch):
    """Same check without relying on permissions (root bypasses them): the write probe's failure is reported."""
    import sagevideo.video_io as vio

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(vio.tempfile, "NamedTemporaryFile", refuse)
    with pytest.raises(VideoWriteError, match="not writable: Permission denied"):
        write_video(tmp_path / "v.mp4", make_video(t=2))


# --------------------------------------------------------------------------------------------------- report


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    dense, accel = make_video(), distort(make_video())
    info = {
        "title": "test report",
        "speedup": 1.83,
        "wall_time_s": {"dense": 12.5, "accelerated": 6.83},
        "schedule": {"dense_steps": [0, 1], "precision": "int8-fp8"},
        "gpu": "none (CPU test)",
        "torch_dtype": torch.bfloat16,  # not JSON: stored as its str()
        "np_scalar": np.float32(0.5),
    }
    doc = write_report(out, dense, accel, info, fps=8)
    return out, dense, accel, doc


def test_report_folder_contents(report_dir):
    out, _, _, _ = report_dir
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "report.html", "side_by_side.mp4"]


def test_metrics_json_equals_direct_computation(report_dir):
    out, dense, accel, doc = report_dir
    raw = (out / "metrics.json").read_text(encoding="utf-8")

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name} in metrics.json")

    strict = json.loads(raw, parse_constant=no_constants)  # strict JSON: no NaN/Infinity literals
    assert strict["metrics"]["psnr"]["per_frame"][0] == "inf"
    m = load_metrics(out)
    assert m == doc
    assert m["schema"] == SCHEMA
    assert m["video"] == {"frames": T, "height": H, "width": W, "fps": 8.0}
    assert set(m["metrics"]) == {"psnr", "ssim", "lpips"}
    direct = {"psnr": video_psnr(dense, accel), "ssim": video_ssim(dense, accel), "lpips": video_lpips(dense, accel)}
    for key, res in direct.items():
        entry = m["metrics"][key]
        assert entry["available"] is True
        assert len(entry["per_frame"]) == T
        np.testing.assert_allclose(entry["per_frame"], res.per_frame, rtol=1e-9)
        assert entry["mean"] == pytest.approx(res.mean, rel=1e-9)
        assert entry["variant"] == res.variant
    assert m["metrics"]["psnr"]["per_frame"][0] == math.inf and m["metrics"]["psnr"]["infinite_frames"] == 1
    assert m["metrics"]["psnr"]["unit"] == "dB"
    assert m["metrics"]["lpips"]["per_frame"][0] == pytest.approx(0.0, abs=1e-6)
    # Caller's info is kept verbatim (non-JSON values stringified).
    info = m["info"]
    assert info["speedup"] == 1.83 and info["wall_time_s"] == {"dense": 12.5, "accelerated": 6.83}
    assert info["schedule"] == {"dense_steps": [0, 1], "precision": "int8-fp8"}
    assert info["torch_dtype"] == "torch.bfloat16" and info["np_scalar"] == 0.5
    assert m["side_by_side"]["difference_gain"] == DIFF_GAIN


def test_side_by_side_video(report_dir):
    out, dense, accel, doc = report_dir
    sbs = read_video(out / "side_by_side.mp4")
    sep = doc["side_by_side"]["separator_px"]
    width = 3 * W + 2 * sep
    assert sbs.shape == (T, H, width + width % 2, 3)
    # Panels in order: dense | accelerated | amplified difference (frame 0 identical -> black panel).
    left, mid = sbs[:, :, :W], sbs[:, :, W + sep:2 * W + sep]
    right = sbs[:, :, 2 * (W + sep):3 * W + 2 * sep]
    assert video_psnr(dense, left).mean > 30
    assert video_psnr(accel[:2], mid[:2]).mean > 28
    assert right[0].mean() < 8  # identical frame
    expected_diff = np.clip(np.abs(dense.astype(int) - accel.astype(int)) * DIFF_GAIN, 0, 255)
    assert right[-1].mean() > 40 and abs(right[-1].mean() - expected_diff[-1].mean()) < 25


def test_report_html_is_self_contained(report_dir):
    out, _, _, doc = report_dir
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert page.count("<svg") == 3  # PSNR, SSIM, LPIPS plots
    assert "<polyline" in page and "<circle" in page
    imgs = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(imgs) >= 3 and len(imgs) % 3 == 0  # dense / accelerated / difference per shown frame
    for b64 in imgs:
        assert base64.b64decode(b64).startswith(b"\x89PNG\r\n\x1a\n")
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower()
    assert not re.search(r'(src|href)="(?!data:|side_by_side\.mp4|metrics\.json)', page)
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    assert "1.83" in page and "int8-fp8" in page  # info table
    assert f"{doc['metrics']['ssim']['mean']:.4g}" in page


def test_report_without_lpips_weights(tmp_path):
    dense, accel = make_video(t=2), distort(make_video(t=2))
    doc = write_report(tmp_path / "r", dense, accel, {"note": "no weights"},
                       lpips_weights=str(tmp_path / "missing.safetensors"))
    lp = load_metrics(tmp_path / "r")["metrics"]["lpips"]
    assert lp["available"] is False and "not found" in lp["reason"]
    assert "per_frame" not in lp and "mean" not in lp  # no made-up number
    assert doc["metrics"]["lpips"] == lp
    page = (tmp_path / "r" / "report.html").read_text(encoding="utf-8")
    assert "unavailable" in page and page.count("<svg") == 2


def test_report_small_frames_and_float_input(tmp_path):
    dense = make_video(t=3, h=24, w=20).astype(np.float32) / 255
    accel = distort(make_video(t=3, h=24, w=20)).astype(np.float32) / 255
    doc = write_report(tmp_path / "r", torch.from_numpy(dense), accel)
    assert doc["metrics"]["lpips"]["available"] is False and "31x31" in doc["metrics"]["lpips"]["reason"]
    assert doc["metrics"]["ssim"]["available"] is True


def test_report_rejects_bad_input(tmp_path):
    v = make_video()
    with pytest.raises(ValueError, match="same shape"):
        write_report(tmp_path / "r", v, v[:2])
    with pytest.raises(TypeError):
        write_report(tmp_path / "r", v, v, info=["not", "a", "dict"])
    with pytest.raises(ValueError, match="diff_gain"):
        write_report(tmp_path / "r", v, v, diff_gain=0)


# ------------------------------------------------------------------------------------------ headless browser

_BROWSER_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
    "--disable-dev-shm-usage",
]


def _chromium() -> str:
    env = os.environ.get("SAGEVIDEO_CHROMIUM")
    if env:
        return env
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no Chromium binary found (install Debian's `chromium` or set $SAGEVIDEO_CHROMIUM)")


class _DevTools:
    """Minimal Chrome DevTools Protocol client over ``--remote-debugging-pipe`` (fds 3 and 4, NUL-framed JSON)."""

    def __init__(self, binary: str, user_data_dir: Path, log_path: Path):
        to_browser_r, self._w = os.pipe()
        self._r, from_browser_w = os.pipe()

        def wire_fds():  # runs in the child: browser reads commands on fd 3, writes replies on fd 4
            a = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10)
            b = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [binary, *_BROWSER_FLAGS, f"--user-data-dir={user_data_dir}", "--remote-debugging-pipe",
             "--window-size=1280,2000", "about:blank"],
            preexec_fn=wire_fds, pass_fds=(3, 4), stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._q: queue.Queue = queue.Queue()
        self._id = 0
        self.events: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        buf = b""
        while True:
            try:
                chunk = os.read(self._r, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                self._q.put(None)
                return
            buf += chunk
            while b"\0" in buf:
                msg, buf = buf.split(b"\0", 1)
                self._q.put(json.loads(msg))

    def _next(self, deadline: float) -> dict:
        msg = self._q.get(timeout=max(0.01, deadline - time.monotonic()))
        if msg is None:
            raise RuntimeError("the browser closed the DevTools pipe")
        return msg

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._next(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method} failed: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 60) -> dict:
        for ev in self.events:
            if ev.get("method") == method:
                return ev
        deadline = time.monotonic() + timeout
        while True:
            ev = self._next(deadline)
            self.events.append(ev)
            if ev.get("method") == method:
                return ev

    def settle(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while True:
            try:
                ev = self._q.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                return
            if ev is None:
                return
            self.events.append(ev)

    def close(self):
        try:
            self.call("Browser.close", timeout=10)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._w, self._r):
            try:
                os.close(fd)
            except OSError:
                pass
        self._log.close()


def _load_page(binary: str, html: Path, tmp: Path) -> dict:
    """Open ``html`` in a fresh headless profile; return what the *page* requested and logged."""
    tools = _DevTools(binary, tmp / "profile", tmp / "browser.log")
    try:
        target = tools.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = tools.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Network", "Runtime", "Log"):
            tools.call(f"{domain}.enable", session=session)
        tools.call("Page.navigate", {"url": html.resolve().as_uri()}, session=session)
        tools.wait_for("Page.loadEventFired")
        tools.settle(0.5)  # late console messages / CSP reports
    finally:
        tools.close()
    page_events = [e for e in tools.events if e.get("sessionId") == session]
    requests = [e["params"]["request"]["url"] for e in page_events if e["method"] == "Network.requestWillBeSent"]
    console = [
        (e["params"]["type"], " ".join(str(a.get("value", a.get("description", ""))) for a in e["params"]["args"]))
        for e in page_events if e["method"] == "Runtime.consoleAPICalled"
    ]
    logs = [(e["params"]["entry"]["level"], e["params"]["entry"]["source"], e["params"]["entry"]["text"])
            for e in page_events if e["method"] == "Log.entryAdded"]
    exceptions = [e["params"]["exceptionDetails"].get("text", "") for e in page_events
                  if e["method"] == "Runtime.exceptionThrown"]
    failed = [e["params"].get("errorText", "") for e in page_events if e["method"] == "Network.loadingFailed"]
    return {"requests": requests, "console": console, "logs": logs, "exceptions": exceptions, "failed": failed}


def _page_problems(seen: dict) -> list[str]:
    problems = [f"network request {u[:80]}" for u in seen["requests"] if not u.startswith(("file:", "data:"))]
    problems += [f"console.{kind}: {text}" for kind, text in seen["console"] if kind in ("error", "assert", "warning")]
    problems += [f"log {lvl}/{src}: {text}" for lvl, src, text in seen["logs"] if lvl in ("error", "warning")]
    problems += [f"exception: {t}" for t in seen["exceptions"]]
    problems += [f"failed load: {t}" for t in seen["failed"]]
    return problems


def test_browser_report_makes_no_requests_and_logs_no_errors(report_dir, tmp_path):
    """Open report.html in headless Chromium through the DevTools protocol and record, for that page only:

    * every request it makes (``Network.requestWillBeSent``) — only the ``file:`` page itself and its inline
      ``data:`` images are allowed. The DevTools view is used instead of a browser-wide net log because
      Chromium itself contacts update/account servers in the background, which says nothing about the page;
    * console calls (``Runtime.consoleAPICalled``), uncaught exceptions, browser log entries
      (``Log.entryAdded``: failed loads, CSP violations, ...) and failed loads — there must be none at error or
      warning level. (``--enable-logging=stderr`` prints console messages without their level, so it cannot
      separate an error from a log line; the protocol can.)

    A deliberately broken page (external image + console.error) is loaded first as a negative control, to show
    that the probe does detect both kinds of problem.
    """
    binary = _chromium()
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head><meta charset="utf-8"><title>bad</title></head><body>'
                   '<img src="https://example.invalid/x.png"><script>console.error("probe-error")</script>'
                   "</body></html>", encoding="utf-8")
    (tmp_path / "bad").mkdir()
    seen_bad = _load_page(binary, bad, tmp_path / "bad")
    problems_bad = _page_problems(seen_bad)
    assert any("example.invalid" in p for p in problems_bad), seen_bad
    assert any("probe-error" in p for p in problems_bad), seen_bad

    out, _, _, _ = report_dir
    (tmp_path / "good").mkdir()
    seen = _load_page(binary, out / "report.html", tmp_path / "good")
    n_data = sum(u.startswith("data:") for u in seen["requests"])
    print(f"report.html in Chromium: {len(seen['requests'])} requests ({n_data} data: images, "
          f"{len(seen['requests']) - n_data} file:), console={seen['console']}, logs={seen['logs']}, "
          f"exceptions={seen['exceptions']}, failed={seen['failed']}")
    assert _page_problems(seen) == []
    assert seen["requests"][0] == (out / "report.html").resolve().as_uri()
    assert n_data >= 3  # the embedded previews were decoded


def test_browser_screenshot_is_not_blank(report_dir, tmp_path):
    """Render report.html with ``chromium --headless --screenshot`` and check the picture.

    Not blank: many distinct colours and real variance; the three plot line colours (PSNR blue, SSIM green,
    LPIPS orange) are present, so the inline SVG was drawn. The browser's own stderr (``--enable-logging=stderr
    --v=0``) must contain no ``CONSOLE`` line: the page has no script, so any console output there would come
    from a failed load or a CSP violation.
    """
    binary = _chromium()
    out, _, _, _ = report_dir
    shot = tmp_path / "report.png"
    proc = subprocess.run(
        [binary, *_BROWSER_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         "--window-size=1280,2000", f"--screenshot={shot}", (out / "report.html").resolve().as_uri()],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.is_file(), proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console

    import imageio.v3 as iio

    img = np.asarray(iio.imread(shot))[..., :3]
    assert img.shape[:2] == (2000, 1280)
    colours = np.unique(img.reshape(-1, 3), axis=0).shape[0]
    near = {
        name: int((np.abs(img.astype(int) - rgb).sum(axis=2) < 40).sum())
        for name, rgb in {"psnr": (0x3A, 0x5C, 0xCC), "ssim": (0x1D, 0x8A, 0x5A), "lpips": (0xC4, 0x57, 0x2B)}.items()
    }
    print(f"screenshot {img.shape[1]}x{img.shape[0]}: {colours} distinct colours, std {img.std():.1f}, "
          f"plot-colour pixels {near}")
    assert colours > 200 and img.std() > 20
    assert all(n > 150 for n in near.values()), near
    keep = os.environ.get("SAGEVIDEO_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)
