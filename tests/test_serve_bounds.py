"""The search server's bounds (crossmodal.serve_uploads): the upload gate (admission, decode
slots, pixel budget), memory given back, blank-by-Unicode text, and the command line's limits."""

from __future__ import annotations

import asyncio
import copy
import io
import struct
import threading
import time
import zlib

import pytest
from PIL import Image

from crossmodal import serve_uploads
from crossmodal.serve_uploads import Limits, QueryError, UploadGate, decode_upload, read_upload
from tests.test_serve import build_serve_run

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402


def _one_line(r, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and body["error"] and "\n" not in body["error"], body
    return body["error"]


def png(size=(40, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_by_hand(w: int, h: int, depth: int = 8, ctype: int = 2, rows: bytes | None = None, extra: bytes = b"") -> bytes:
    """A PNG whose header says w x h; ``rows`` (filter byte + pixels per row) may be short or absent."""
    idat = _chunk(b"IDAT", zlib.compress(rows)) if rows is not None else b""
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, ctype, 0, 0, 0)) + extra
            + idat + _chunk(b"IEND", b""))


# --- the gate, without a server -------------------------------------------------------------


def test_limits_defaults_follow_the_cores_and_are_checked(monkeypatch):
    monkeypatch.setattr(serve_uploads, "available_cores", lambda: 3)
    lim = Limits()
    assert (lim.upload_slots, lim.upload_queue, lim.pixel_budget) == (3, 12, 2 * lim.max_pixels)
    monkeypatch.setattr(serve_uploads, "available_cores", lambda: 64)
    assert Limits().upload_slots == serve_uploads.MAX_DEFAULT_SLOTS
    assert Limits(upload_slots=1).pixel_budget == Limits().max_pixels
    with pytest.raises(ValueError, match="pixel_budget"):
        Limits(max_pixels=100, pixel_budget=99)
    for bad in ({"upload_slots": 0}, {"upload_queue": -1}, {"max_pixels": 0}, {"body_timeout_s": 0}):
        with pytest.raises(ValueError):
            Limits(**bad)


def test_admission_refuses_past_slots_plus_queue_and_frees_its_place():
    gate = UploadGate(Limits(upload_slots=1, upload_queue=1))
    with gate.admit(), gate.admit():
        with pytest.raises(QueryError) as e, gate.admit():
            pass
        assert e.value.status == 503 and "busy" in e.value.message and "\n" not in e.value.message
    assert gate.admitted == 0
    with pytest.raises(RuntimeError), gate.admit():
        raise RuntimeError("a failing upload")
    assert gate.admitted == 0 and gate.peak["admitted"] == 2


def _hold(gate: UploadGate, pixels: int, entered: threading.Event, release: threading.Event, errors: list):
    try:
        with gate.decoding(pixels):
            entered.set()
            release.wait(5)
    except QueryError as e:
        errors.append(e)


def test_pixel_budget_counts_every_decode_in_flight():
    gate = UploadGate(Limits(max_pixels=100, upload_slots=4, pixel_budget=150, upload_wait_s=5))
    a_in, a_go, b_in, b_go, c_in, c_go = (threading.Event() for _ in range(6))
    errors: list = []
    a = threading.Thread(target=_hold, args=(gate, 100, a_in, a_go, errors))
    a.start()
    assert a_in.wait(5)
    b = threading.Thread(target=_hold, args=(gate, 100, b_in, b_go, errors))  # 100 + 100 > 150: waits
    b.start()
    c = threading.Thread(target=_hold, args=(gate, 40, c_in, c_go, errors))  # 100 + 40 <= 150: runs now
    c.start()
    assert c_in.wait(5) and not b_in.wait(0.3)
    assert gate.pixels == 140 and gate.running == 2
    a_go.set()
    assert b_in.wait(5)  # A's pixels returned: B decodes
    c_go.set()
    b_go.set()
    for t in (a, b, c):
        t.join(5)
    assert not errors and gate.running == gate.pixels == 0 and gate.peak["pixels"] <= 150


def test_slots_bound_concurrent_decodes_and_a_long_wait_is_503():
    gate = UploadGate(Limits(max_pixels=10, upload_slots=2, pixel_budget=1000, upload_wait_s=0.3))
    go = threading.Event()
    entered = [threading.Event() for _ in range(2)]
    errors: list = []
    holders = [threading.Thread(target=_hold, args=(gate, 1, entered[i], go, errors)) for i in range(2)]
    for t in holders:
        t.start()
    assert all(e.wait(5) for e in entered)
    t0 = time.monotonic()
    with pytest.raises(QueryError) as e, gate.decoding(1):
        pass
    assert e.value.status == 503 and "busy" in e.value.message and 0.25 < time.monotonic() - t0 < 3
    go.set()
    for t in holders:
        t.join(5)
    assert not errors and gate.peak["running"] == 2 and gate.running == 0


def test_memory_is_given_back_after_large_decodes_only(monkeypatch):
    calls = []
    monkeypatch.setattr(serve_uploads, "return_freed_memory", lambda: calls.append(1) or True)
    gate = UploadGate(Limits(upload_slots=2))
    with gate.decoding(10), gate.decoding(serve_uploads.TRIM_PIXELS - 1):
        pass
    assert calls == []  # small decodes: a trim would cost the next query its page faults
    with gate.decoding(10):
        with gate.decoding(serve_uploads.TRIM_PIXELS):
            pass
        assert len(calls) == 1  # a large one gives its memory back as soon as it ends
    assert len(calls) == 1


def test_decodes_run_on_the_gates_own_threads():
    gate = UploadGate(Limits(upload_slots=2))
    names = {gate.run(1, lambda: threading.current_thread().name) for _ in range(20)}
    assert 1 <= len(names) <= 2 and all(n.startswith("upload-decode") for n in names)


def test_return_freed_memory_works_on_glibc():
    import sys

    from crossmodal.perf import _glibc, return_freed_memory

    if not sys.platform.startswith("linux") or _glibc() is None:
        pytest.skip("glibc only")
    blocks = [bytearray(8 * 2**20) for _ in range(8)]
    del blocks
    assert isinstance(return_freed_memory(), bool)


def test_decode_checks_pixels_from_the_header_before_decoding(monkeypatch):
    def no_decode(*a, **k):
        raise AssertionError("decoded an image over the pixel limit")

    monkeypatch.setattr("crossmodal.coco.load_image", no_decode)
    gate = UploadGate(Limits(max_pixels=10_000))
    with pytest.raises(QueryError) as e:  # the header says 101x100; the data would not even decode
        decode_upload(png_by_hand(101, 100), gate.limits, gate)
    assert e.value.status == 413 and "101x100" in e.value.message and gate.peak["running"] == 0


def test_transparent_images_count_more_of_the_budget():
    lim = Limits(max_pixels=10_000, pixel_budget=22_000, upload_slots=2)
    for mode, cost in (("RGB", 10_000), ("L", 10_000), ("RGBA", 22_000), ("LA", 22_000)):  # 25,000, capped
        gate = UploadGate(lim)
        decode_upload(png((100, 100), mode), lim, gate)
        assert gate.peak["pixels"] == cost, mode
    gate = UploadGate(lim)
    buf = io.BytesIO()
    Image.new("P", (80, 50)).save(buf, format="PNG", transparency=0)
    decode_upload(buf.getvalue(), lim, gate)
    assert gate.peak["pixels"] == 10_000 and gate.pixels == 0


def test_failed_decodes_leave_the_gate_free(monkeypatch):
    gate = UploadGate(Limits(upload_slots=1, upload_wait_s=0.5))
    good = png()
    for bad in (good[:-30], png_by_hand(50, 50, rows=b"\x00" * 10)):
        with pytest.raises(QueryError) as e:
            decode_upload(bad, gate.limits, gate)
        assert e.value.status == 422 and "truncated or corrupt" in e.value.message
    assert gate.running == gate.pixels == 0
    x, size = decode_upload(good, gate.limits, gate, prepare=lambda im: (im.mode, im.size))
    assert (x, size) == ("RGB", (40, 30)) and gate.running == 0

    from crossmodal.errors import DataError

    def fails_without_words(*a, **k):  # a decoder error whose message is empty: was an IndexError (500)
        raise DataError("") from OSError()

    monkeypatch.setattr("crossmodal.coco.load_image", fails_without_words)
    with pytest.raises(QueryError) as e:
        decode_upload(good, gate.limits, gate)
    assert e.value.status == 422 and "OSError" in e.value.message and gate.running == 0


class _FakeRequest:
    def __init__(self, chunks, headers=None, delay=0.0, disconnect=False):
        self.headers, self._chunks, self._delay, self._disconnect = headers or {}, chunks, delay, disconnect

    async def stream(self):
        from starlette.requests import ClientDisconnect

        for c in self._chunks:
            await asyncio.sleep(self._delay)
            yield c
        if self._disconnect:
            raise ClientDisconnect()


def test_read_upload_slow_disconnected_and_lying_bodies():
    lim = Limits(max_upload_bytes=1000, body_timeout_s=0.3)
    assert asyncio.run(read_upload(_FakeRequest([b"ab", b"cd"]), lim)) == b"abcd"
    cases = [(_FakeRequest([b"x"] * 50, delay=0.05), 408, "did not arrive within 0.3 s"),
             (_FakeRequest([b"x" * 10], disconnect=True), 400, "disconnected"),
             (_FakeRequest([b"x" * 800] * 200), 413, "limit of 1000 bytes"),
             (_FakeRequest([], headers={"content-length": str(10**12)}), 413, "limit of 1000 bytes")]
    for req, status, words in cases:
        with pytest.raises(QueryError) as e:
            asyncio.run(read_upload(req, lim))
        assert e.value.status == status and words in e.value.message, (status, e.value.message)


# --- through the app ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def searcher(tmp_path_factory):
    from crossmodal.serve import Searcher

    paths = build_serve_run(tmp_path_factory.getbasetemp() / "serve_run")
    return Searcher.from_run(paths["run"], "val", paths["root"])


@pytest.fixture(scope="module")
def client(searcher):
    from crossmodal.serve import create_app

    with TestClient(create_app(searcher)) as c:
        yield c


@pytest.mark.parametrize("q", ["\u200b", "\u200b \u00a0\u2060", "\ufeff", "\x00", "\u202e", "\U000e0041\U000e0042",
                               "\u3000\u200b\t"])
def test_invisible_text_is_blank(client, q):
    assert "blank" in _one_line(client.get("/api/text", params={"q": q, "k": 3}), 422)


def test_visible_text_around_invisible_characters_answers(client):
    for q in ("\u200b" * 400 + "a dog", "a\x00dog", "🙂", "<script>x</script>"):
        assert client.get("/api/text", params={"q": q, "k": 3}).status_code == 200, q


def test_info_shows_the_upload_limits(client, searcher):
    lim = client.get("/api/info").json()["limits"]
    assert lim["upload_slots"] == searcher.limits.upload_slots and lim["pixel_budget"] >= lim["max_pixels"]
    assert lim["upload_queue"] == searcher.limits.upload_queue


def test_a_full_server_answers_503_in_one_line(searcher):
    from crossmodal.serve import create_app

    small = copy.copy(searcher)
    small.uploads = UploadGate(Limits(upload_slots=1, upload_queue=0))
    with TestClient(create_app(small)) as c, small.uploads.admit():
        r = c.post("/api/upload", content=png(), headers={"content-type": "image/png"})
        assert "busy" in _one_line(r, 503) and r.headers["retry-after"] == "5"
    assert small.uploads.admitted == 0
    assert c.post("/api/upload", content=png(), headers={"content-type": "image/png"}).status_code == 200


def _odd(mode: str, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (40, 30)).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _frames(fmt: str) -> bytes:
    buf = io.BytesIO()
    frames = [Image.new("RGB", (20, 20), c) for c in ("red", "blue")]
    frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:])
    return buf.getvalue()


def _pal_transparent() -> bytes:
    buf = io.BytesIO()
    Image.new("P", (40, 30)).save(buf, format="PNG", transparency=0)
    return buf.getvalue()


ODD_OK = {
    "CMYK JPEG": lambda: _odd("CMYK", "JPEG"),
    "16-bit grey PNG": lambda: _odd("I;16"),
    "16-bit RGB PNG": lambda: png_by_hand(40, 30, 16, 2, b"".join(b"\x00" + b"\x12\x34" * 120 for _ in range(30))),
    "16-bit RGBA PNG": lambda: png_by_hand(40, 30, 16, 6, b"".join(b"\x00" + b"\x12\x34" * 160 for _ in range(30))),
    "palette PNG with transparency": _pal_transparent,
    "1-bit PNG": lambda: _odd("1"),
    "LA PNG": lambda: _odd("LA"),
    "animated PNG": lambda: _frames("PNG"),
    "MPO (multi-frame JPEG)": lambda: _frames("MPO"),
    "progressive JPEG": lambda: _odd("RGB", "JPEG", progressive=True),
    "1x1 PNG": lambda: png((1, 1)),
}
ODD_REFUSED = {
    "animated GIF": (lambda: _frames("GIF"), 415),
    "WebP": (lambda: _odd("RGB", "WEBP"), 415),
    "TIFF": (lambda: _odd("RGB", "TIFF"), 415),
    "header of 100000x100000": (lambda: png_by_hand(100_000, 100_000, rows=b"\x00"), 413),
    "width 0": (lambda: png_by_hand(0, 10, rows=b"\x00"), 415),
    "iCCP zlib bomb": (lambda: png_by_hand(4, 4, rows=b"\x00" * 52, extra=_chunk(
        b"iCCP", b"x\x00\x00" + zlib.compress(b"\x00" * 50_000_000))), 422),
    "zTXt zlib bomb": (lambda: png_by_hand(4, 4, rows=b"\x00" * 52, extra=_chunk(
        b"zTXt", b"k\x00\x00" + zlib.compress(b"a" * 50_000_000))), 422),
}


@pytest.mark.parametrize("name", list(ODD_OK))
def test_odd_but_valid_uploads_answer(client, name):
    r = client.post("/api/upload", params={"k": 3}, content=ODD_OK[name](), headers={"content-type": "image/png"})
    assert r.status_code == 200, (name, r.text)
    assert len(r.json()["images"]) == 3


@pytest.mark.parametrize("name", list(ODD_REFUSED))
def test_hostile_uploads_are_one_line_4xx(client, searcher, name):
    make, status = ODD_REFUSED[name]
    _one_line(client.post("/api/upload", content=make(), headers={"content-type": "image/png"}), status)
    assert searcher.uploads.admitted == searcher.uploads.running == searcher.uploads.pixels == 0


@pytest.mark.parametrize("body,ctype,words", [
    (b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\nabc\r\n--XyZ\r\n"
     b"Content-Disposition: form-data; name=\"file\"; filename=\"b.png\"\r\n\r\nabc\r\n--XyZ--\r\n",
     "multipart/form-data; boundary=XyZ", "Too many files"),
    (b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc\r\n--XyZ--\r\n",
     "multipart/form-data; boundary=XyZ", "no file field"),
    (b"abc", "multipart/form-data", "boundary"),
    (b"".join(b"--XyZ\r\nContent-Disposition: form-data; name=\"f%d\"\r\n\r\nx\r\n" % i for i in range(100))
     + b"--XyZ--\r\n", "multipart/form-data; boundary=XyZ", "Too many fields"),
])
def test_malformed_multipart_is_422(client, body, ctype, words):
    assert words in _one_line(client.post("/api/upload", content=body, headers={"content-type": ctype}), 422)


def test_concurrent_mixed_queries_all_answer(client, searcher):
    jpeg = searcher.image_path(int(searcher.gallery.img_ids[1])).read_bytes()
    out: list = []

    def one(i: int):
        if i % 3 == 0:
            out.append(client.get("/api/text", params={"q": "a red circle", "k": 5}).status_code)
        elif i % 3 == 1:
            out.append(client.post("/api/upload", content=jpeg, headers={"content-type": "image/jpeg"}).status_code)
        else:
            out.append(client.get(f"/api/image/{int(searcher.gallery.img_ids[2])}").status_code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3 * searcher.limits.upload_slots + 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert out == [200] * len(threads)


# --- the command line -----------------------------------------------------------------------


@pytest.mark.parametrize("flag,value", [
    ("--max-upload-mb", "nan"), ("--max-upload-mb", "inf"), ("--max-upload-mb", "-1"), ("--max-upload-mb", "0"),
    ("--max-upload-mb", "1e-12"), ("--max-upload-mb", "abc"), ("--max-pixels", "nan"), ("--max-pixels", "inf"),
    ("--max-pixels", "-5"), ("--max-pixels", "0"), ("--upload-slots", "0"), ("--upload-queue", "-1"),
    ("--pixel-budget", "10"), ("--port", "70000"), ("--threads", "0"), ("--max-connections", "0"),
])
def test_bad_limits_are_one_line_exit_2(capsys, flag, value):
    from crossmodal.serve import main

    with pytest.raises(SystemExit) as e:
        main(["--run", "nowhere", "--coco-root", "nowhere", flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert f"error: argument {flag}: " in err[-1], err
    assert "Traceback" not in "\n".join(err)


def test_bad_limit_as_a_real_command_has_no_traceback():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "crossmodal.serve", "--run", "x", "--coco-root", "x",
                        "--max-upload-mb", "nan"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].endswith("'nan' is not a finite number")
