"""sbir_core.data.download against a loopback HTTP server with Range support; no internet."""
from __future__ import annotations

import hashlib
import io
import re
import socket
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from sbir_core import cli
from sbir_core.data import download as dl

ARCHIVE_PATH = "/files/caltech-101.zip"


def _png(seed: int) -> bytes:
    """A tiny PNG of deterministic noise, so the archive doesn't compress to a few bytes."""
    noise = b"".join(hashlib.sha256(f"{seed}-{k}".encode()).digest() for k in range(14))
    buf = io.BytesIO()
    Image.frombytes("RGB", (12, 12), noise[:12 * 12 * 3]).save(buf, "PNG")
    return buf.getvalue()


def _tar_gz(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def make_caltech_like() -> bytes:
    """Same layout as the real caltech-101.zip: a zip holding a tar.gz of class folders."""
    inner = {f"101_ObjectCategories/{cls}/image_{i:04d}.jpg": _png(10 * c + i)
             for c, cls in enumerate(("accordion", "airplanes")) for i in range(1, 4)}
    inner["101_ObjectCategories/BACKGROUND_Google/image_0001.jpg"] = _png(99)
    inner["101_ObjectCategories/accordion/._image_0001.jpg"] = b"AppleDouble junk"
    return _zip({
        "caltech-101/101_ObjectCategories.tar.gz": _tar_gz(inner),
        "caltech-101/Annotations.tar": b"not needed",
        "__MACOSX/caltech-101/._101_ObjectCategories.tar.gz": b"junk",
    })


ARCHIVE = make_caltech_like()
MD5 = hashlib.md5(ARCHIVE).hexdigest()
SHA256 = hashlib.sha256(ARCHIVE).hexdigest()


class RangeHandler(BaseHTTPRequestHandler):
    """Serves `server.files`, honouring `Range: bytes=N-` unless `server.ignore_range`.

    `server.cut_after` (bytes) makes the first request stop early and drop the connection.
    Every request's Range header is appended to `server.ranges`.
    """

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        srv = self.server
        rng = self.headers.get("Range")
        srv.ranges.append(rng)
        data = srv.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start, status = 0, 200
        match = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if match and not srv.ignore_range:
            start, status = int(match.group(1)), 206
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if srv.cut_after is not None and len(srv.ranges) == 1:
            body = body[:srv.cut_after]  # then HTTP/1.0 closes the connection: a short read
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    srv.daemon_threads = True
    srv.files = {ARCHIVE_PATH: ARCHIVE}
    srv.ranges, srv.cut_after, srv.ignore_range = [], None, False
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}{ARCHIVE_PATH}"
    yield srv
    srv.shutdown()
    srv.server_close()


def _classes(out: Path) -> dict[str, list[str]]:
    return {d.name: sorted(f.name for f in d.iterdir()) for d in sorted(out.iterdir())}


def test_registry_has_caltech101_with_published_checksum() -> None:
    spec = dl.DATASETS["caltech101"]
    assert spec.url == "https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip"
    assert spec.md5 == "3138e1922a9193bfa496528edbbc45d0"
    assert spec.inner == ("caltech-101/101_ObjectCategories.tar.gz",)


def test_full_download_and_extract(server, tmp_path: Path) -> None:
    out = tmp_path / "caltech101" / "images"
    counts = dl.fetch_dataset("caltech101", out, url=server.url, md5=MD5, progress=False)
    assert counts == {"accordion": 3, "airplanes": 3}
    assert _classes(out) == {c: [f"image_{i:04d}.jpg" for i in (1, 2, 3)] for c in counts}
    with Image.open(out / "accordion" / "image_0001.jpg") as im:
        assert im.size == (12, 12)
    # Archive removed after extraction, nothing half-done left beside the output.
    assert sorted(p.name for p in out.parent.iterdir()) == ["images"]
    assert server.ranges == [None]


def test_interrupted_download_resumes_with_range(server, tmp_path: Path) -> None:
    server.cut_after = 1000
    dest = tmp_path / "caltech-101.zip"
    dl.download(server.url, dest, md5=MD5, sha256=SHA256, retries=2, retry_wait=0, progress=False)
    assert server.ranges == [None, "bytes=1000-"]
    assert dest.read_bytes() == ARCHIVE
    assert not (tmp_path / "caltech-101.zip.part").exists()


def test_failed_download_keeps_part_and_rerun_resumes(server, tmp_path: Path) -> None:
    server.cut_after = 1500
    dest = tmp_path / "caltech-101.zip"
    with pytest.raises(dl.DownloadError, match=r"network error .* kept .*\.part \(1500 bytes\).*rerun"):
        dl.download(server.url, dest, md5=MD5, retries=0, progress=False)
    assert (tmp_path / "caltech-101.zip.part").stat().st_size == 1500
    dl.download(server.url, dest, md5=MD5, retries=0, progress=False)  # the rerun
    assert server.ranges == [None, "bytes=1500-"]
    assert hashlib.md5(dest.read_bytes()).hexdigest() == MD5


def test_server_ignoring_range_restarts_cleanly(server, tmp_path: Path) -> None:
    server.ignore_range = True
    part = tmp_path / "caltech-101.zip.part"
    part.write_bytes(b"x" * 700)  # stale bytes that must not stay in front
    dest = dl.download(server.url, tmp_path / "caltech-101.zip", md5=MD5, progress=False)
    assert server.ranges == ["bytes=700-"]
    assert dest.read_bytes() == ARCHIVE


def test_complete_part_file_is_verified_not_refetched(server, tmp_path: Path) -> None:
    (tmp_path / "caltech-101.zip.part").write_bytes(ARCHIVE)
    dest = dl.download(server.url, tmp_path / "caltech-101.zip", md5=MD5, progress=False)
    assert server.ranges == [f"bytes={len(ARCHIVE)}-"]  # answered 416, nothing re-downloaded
    assert dest.read_bytes() == ARCHIVE


def test_wrong_checksum_fails_clearly_and_removes_partial(server, tmp_path: Path) -> None:
    dest = tmp_path / "caltech-101.zip"
    with pytest.raises(dl.ChecksumError) as info:
        dl.download(server.url, dest, md5="0" * 32, progress=False)
    message = str(info.value)
    assert "checksum mismatch" in message and "deleted" in message and MD5 in message
    assert "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_network_failure_is_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(dl.DownloadError, match="network error .*Connection refused.*rerun the same command"):
        dl.download(f"http://127.0.0.1:{port}/x.zip", tmp_path / "x.zip", md5=MD5,
                    retries=0, timeout=2, progress=False)


def test_http_404_is_reported(server, tmp_path: Path) -> None:
    with pytest.raises(dl.DownloadError, match="HTTP 404"):
        dl.download(server.url + ".missing", tmp_path / "x.zip", md5=MD5, progress=False)


@pytest.mark.parametrize("bad_name", ["../evil.jpg", "/tmp/evil.jpg", "101_ObjectCategories/cat/../../evil.jpg"])
def test_unsafe_tar_members_are_rejected(tmp_path: Path, bad_name: str) -> None:
    archive = tmp_path / "a.zip"
    archive.write_bytes(_zip({"inner.tar.gz": _tar_gz({
        "101_ObjectCategories/cat/ok.jpg": b"fine", bad_name: b"evil"})}))
    out = tmp_path / "deep" / "out"
    with pytest.raises(dl.UnsafeArchiveError, match="refusing"):
        dl.extract(archive, out, inner=("inner.tar.gz",), root="101_ObjectCategories")
    assert not out.exists() and not (tmp_path / "evil.jpg").exists()
    assert list((tmp_path / "deep").iterdir()) == []  # staging cleaned up


def test_unsafe_zip_member_is_rejected(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    archive.write_bytes(_zip({"root/cat/ok.jpg": b"fine", "root/../../evil.jpg": b"evil"}))
    with pytest.raises(dl.UnsafeArchiveError):
        dl.extract(archive, tmp_path / "out", root="root")
    assert not (tmp_path / "out").exists()


def test_cli_download(server, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "gallery"
    code = cli.main(["gallery", "download", "caltech101", "--url", server.url,
                     "--md5", MD5, "--out", str(out)])
    assert code == 0
    assert sorted(_classes(out)) == ["accordion", "airplanes"]
    assert "2 classes, 6 images" in capsys.readouterr().out


def test_cli_checksum_mismatch_is_one_line_error(server, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["gallery", "download", "caltech101", "--url", server.url,
                     "--sha256", "ab" * 32, "--out", str(tmp_path / "gallery")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: checksum mismatch") and "\n" not in err
    assert not any(tmp_path.rglob("*.part"))
