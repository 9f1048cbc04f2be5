"""Download public image galleries: `python -m sbir_core gallery download caltech101`.

The archive is fetched over HTTP with resume (Range requests continue a `.part`
file), verified against a published checksum, then unpacked safely (through any
nested archives) into one folder per class. Only the standard library and tqdm.
"""
from __future__ import annotations

import hashlib
import http.client
import logging
import re
import shutil
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sbir_core.errors import InputError, SBIRError
from typing import IO, Iterator

from tqdm import tqdm

log = logging.getLogger(__name__)

CHUNK = 1 << 16
USER_AGENT = "sbir_core-gallery-download/1.0 (+python-urllib)"


@dataclass(frozen=True)
class Dataset:
    """Where a gallery lives and how its archive is laid out."""

    url: str
    filename: str                 # local name of the downloaded archive
    md5: str | None = None
    sha256: str | None = None
    inner: tuple[str, ...] = ()   # nested archives to open in turn, each a member of the previous one
    root: str = ""                # folder inside the innermost archive that holds one folder per class
    exclude: tuple[str, ...] = () # top-level folders under `root` that are not classes
    description: str = ""


DATASETS: dict[str, Dataset] = {
    "caltech101": Dataset(
        url="https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip",
        filename="caltech-101.zip",
        # Published for caltech-101.zip on the CaltechDATA record, doi:10.22002/D1.20086.
        md5="3138e1922a9193bfa496528edbbc45d0",
        inner=("caltech-101/101_ObjectCategories.tar.gz",),
        root="101_ObjectCategories",
        # Clutter images, not an object category.
        exclude=("BACKGROUND_Google",),
        description="Caltech-101: 101 object categories, about 9k photos (Fei-Fei, Fergus, Perona 2004)",
    ),
}


class DownloadError(SBIRError):
    """A download or extraction failed; the message is one line meant for the user."""


class ChecksumError(DownloadError):
    """The downloaded file does not match the expected checksum."""


class UnsafeArchiveError(DownloadError):
    """An archive member would escape the output folder (absolute path, `..`, link)."""


class _RangeNotSatisfiable(Exception):
    """HTTP 416 on a resume: the .part file already holds the whole file (or more)."""


# --------------------------------------------------------------------------- download


def file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_hex(value: str | None, algorithm: str) -> str | None:
    if value is None:
        return None
    value = value.strip().lower()
    length = {"md5": 32, "sha256": 64}[algorithm]
    if not re.fullmatch(rf"[0-9a-f]{{{length}}}", value):
        raise InputError(f"--{algorithm} must be {length} hex digits, got {value!r}")
    return value


def _mismatch(path: Path, md5: str | None, sha256: str | None) -> str | None:
    """None when `path` matches every given checksum, else a description of the first mismatch."""
    for algorithm, expected in (("sha256", sha256), ("md5", md5)):
        if expected:
            got = file_digest(path, algorithm)
            if got != expected:
                return f"expected {algorithm} {expected}, got {got}"
    return None


def _fetch(url: str, part: Path, timeout: float, progress: bool) -> None:
    """Fetch `url` into `part`, continuing from its current size when the server allows."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            raise _RangeNotSatisfiable() from exc
        raise
    with response:
        length = response.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        mode = "ab"
        if offset and response.status == 206:
            match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != offset:
                # A range we did not ask for: appending it would corrupt the file.
                part.unlink()
                raise DownloadError(f"server answered a resume from byte {offset} with Content-Range "
                                    f"{response.headers.get('Content-Range')!r}; deleted the partial "
                                    "file, rerun to download from the start")
        elif offset:
            # Server ignored Range and sent the whole file: start over rather than append.
            log.info("server ignored the Range request; restarting %s from the beginning", part.name)
            offset, mode = 0, "wb"
        total = offset + length if length is not None else None
        received = 0
        with part.open(mode) as fh, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                        unit_divisor=1024, desc=part.name.removesuffix(".part"),
                                        disable=None if progress else True, leave=False) as bar:
            while True:
                block = response.read(CHUNK)
                if not block:
                    break
                fh.write(block)
                received += len(block)
                bar.update(len(block))
        # http.client returns a short body without error when the peer closes early.
        if length is not None and received < length:
            raise ConnectionError(f"connection closed after {offset + received} of {total} bytes")


def download(url: str, dest: Path | str, *, md5: str | None = None, sha256: str | None = None,
             retries: int = 3, retry_wait: float = 2.0, timeout: float = 60.0,
             progress: bool = True) -> Path:
    """Download `url` to `dest`, resuming `dest.part` across failures, and verify it.

    Network failures are retried `retries` times, each continuing where the last one
    stopped; the `.part` file is kept if they all fail, so calling again resumes.
    A checksum mismatch deletes the partial file and raises ChecksumError.
    """
    dest = Path(dest)
    md5, sha256 = _check_hex(md5, "md5"), _check_hex(sha256, "sha256")
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        if (md5 or sha256) and _mismatch(dest, md5, sha256) is None:
            log.info("%s already downloaded and verified", dest)
            return dest
        dest.unlink()  # stale or unverifiable: fetch again
    failures = 0
    while True:
        try:
            _fetch(url, part, timeout, progress)
            break
        except _RangeNotSatisfiable:
            break  # nothing left to fetch; the checksum below decides whether it is whole
        except urllib.error.HTTPError as exc:
            if exc.code < 500 or failures >= retries:
                raise DownloadError(f"HTTP {exc.code} {exc.reason} for {url}") from exc
            failures += 1
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            if failures >= retries:
                reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
                reason = str(reason) or exc.__class__.__name__
                kept = part.stat().st_size if part.exists() else 0
                advice = (f"kept {part} ({kept} bytes), rerun the same command to resume" if kept
                          else "rerun the same command to try again")
                raise DownloadError(f"network error downloading {url}: {reason}; {advice}") from exc
            failures += 1
        log.warning("download interrupted; resuming (retry %d of %d)", failures, retries)
        time.sleep(retry_wait * failures)
    if not part.exists():
        part.touch()  # an empty body is still a file to verify
    if md5 or sha256:
        problem = _mismatch(part, md5, sha256)
        if problem:
            part.unlink()
            raise ChecksumError(f"checksum mismatch for {dest.name} from {url}: {problem}; "
                                f"deleted the partial file {part}")
    else:
        log.warning("no checksum given for %s; not verified", dest.name)
    part.replace(dest)
    return dest


# --------------------------------------------------------------------------- extract


def _safe_relpath(name: str) -> PurePosixPath:
    """Member name as a relative path, refusing anything that could land outside the target."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise UnsafeArchiveError(f"refusing archive member with an absolute path: {name!r}")
    parts = [p for p in re.split(r"[\\/]+", name) if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"refusing archive member with '..' in its path: {name!r}")
    return PurePosixPath(*parts)


def _is_zip(fh: IO[bytes]) -> bool:
    """Zip or not, from the magic bytes: cheap even on a compressed member of another archive."""
    pos = fh.tell()
    head = fh.read(4)
    fh.seek(pos)
    return head in (b"PK\x03\x04", b"PK\x05\x06")


@contextmanager
def _open_member(fh: IO[bytes], name: str) -> Iterator[IO[bytes]]:
    """Open member `name` of the zip or tar archive in `fh` as a readable file."""
    _safe_relpath(name)
    missing = DownloadError(f"archive has no member {name!r}; unexpected layout")
    with ExitStack() as stack:
        if _is_zip(fh):
            archive = stack.enter_context(zipfile.ZipFile(fh))
            if name not in archive.namelist():
                raise missing
            member: IO[bytes] | None = archive.open(name)
        else:
            tar = stack.enter_context(tarfile.open(fileobj=fh, mode="r:*"))
            try:
                member = tar.extractfile(tar.getmember(name))
            except KeyError:
                raise missing from None
            if member is None:
                raise DownloadError(f"archive member {name!r} is not a file")
        yield stack.enter_context(member)


def _members(fh: IO[bytes]) -> Iterator[tuple[str, IO[bytes] | None]]:
    """(name, readable file or None for non-files) for each member, streaming tar archives."""
    if fh.seekable() and _is_zip(fh):
        with zipfile.ZipFile(fh) as archive:
            for info in archive.infolist():
                if info.is_dir():
                    yield info.filename, None
                else:
                    with archive.open(info) as member:
                        yield info.filename, member
        return
    # Stream mode reads the (possibly nested, non-seekable) tar once, front to back.
    with tarfile.open(fileobj=fh, mode="r|*") as archive:
        for info in archive:
            if info.issym() or info.islnk():
                raise UnsafeArchiveError(f"refusing archive member that is a link: {info.name!r}")
            member = archive.extractfile(info) if info.isfile() else None
            yield info.name, member


def extract(archive: Path | str, out: Path | str, *, inner: tuple[str, ...] = (), root: str = "",
            exclude: tuple[str, ...] = ()) -> dict[str, int]:
    """Unpack `archive` (through the nested archives `inner`) into `out`/<class>/<file>.

    Only files under `root` that sit inside a class folder are kept; names starting
    with '.' (AppleDouble, .DS_Store) are skipped. Work happens in a staging folder
    beside `out`, so a failure leaves `out` as it was. Returns {class: file count}.
    """
    archive, out = Path(archive), Path(out)
    root_parts = _safe_relpath(root).parts if root else ()
    skip = set(exclude)
    staging = out.parent / f".{out.name}.extracting"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    counts: dict[str, int] = {}
    try:
        with ExitStack() as stack:
            fh: IO[bytes] = stack.enter_context(archive.open("rb"))
            for name in inner:
                fh = stack.enter_context(_open_member(fh, name))
            for name, member in _members(fh):
                rel = _safe_relpath(name)  # checked even for members we skip
                if member is None or rel.parts[:len(root_parts)] != root_parts:
                    continue
                parts = rel.parts[len(root_parts):]
                if len(parts) < 2 or parts[0] in skip or any(p.startswith(".") for p in parts):
                    continue
                target = staging.joinpath(*parts)
                if not target.resolve().is_relative_to(staging.resolve()):
                    raise UnsafeArchiveError(f"refusing archive member outside the output: {name!r}")
                target.parent.mkdir(parents=True, exist_ok=True)
                with target.open("wb") as dst:
                    shutil.copyfileobj(member, dst, CHUNK)
                counts[parts[0]] = counts.get(parts[0], 0) + 1
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise DownloadError(f"cannot read archive {archive.name}: {exc}") from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not counts:
        shutil.rmtree(staging, ignore_errors=True)
        raise DownloadError(f"no class folders found under {root or 'the top'} of {archive.name}")
    out.mkdir(parents=True, exist_ok=True)
    for cls in counts:  # replace class folders one by one; other folders in `out` are left alone
        if (out / cls).exists():
            shutil.rmtree(out / cls)
        (staging / cls).replace(out / cls)
    shutil.rmtree(staging, ignore_errors=True)
    return dict(sorted(counts.items()))


# --------------------------------------------------------------------------- dataset


def fetch_dataset(name: str, out: Path | str | None = None, *, url: str | None = None,
                  md5: str | None = None, sha256: str | None = None, keep_archive: bool = False,
                  retries: int = 3, progress: bool = True) -> dict[str, int]:
    """Download, verify and unpack registered dataset `name` into `out` (one folder per class).

    `url`, `md5` and `sha256` override the registry (a mirror, a test server); giving
    either checksum replaces both registered ones. The archive is saved beside `out`
    and removed after a successful extraction unless `keep_archive`.
    """
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    spec = DATASETS[name]
    out = Path(out) if out is not None else Path("galleries") / name / "images"
    if md5 is None and sha256 is None:
        md5, sha256 = spec.md5, spec.sha256
    archive = out.parent / spec.filename
    log.info("downloading %s to %s", url or spec.url, archive)
    download(url or spec.url, archive, md5=md5, sha256=sha256, retries=retries, progress=progress)
    log.info("extracting %s into %s", archive.name, out)
    counts = extract(archive, out, inner=spec.inner, root=spec.root, exclude=spec.exclude)
    if not keep_archive:
        archive.unlink()
    return counts
