"""Pull banks into the cache from a built-in name, a folder, an archive or an http(s) URL.

A pull stages the bank in ``cache_dir()/banks/.NAME.pull``: it checks the manifest's file names
before fetching anything, checks every file's sha256 against the manifest and every anchor's
tensors against the base model, and only then renames the staged folder over
``cache_dir()/banks/NAME``. A failed pull leaves the installed bank as it was. The staged folder
keeps finished files and ``.part`` files, so running the same pull again resumes with HTTP
Range requests.

Remote layout: a bank URL is a folder that serves ``manifest.json`` and each file the manifest
names next to it. An index is a JSON file listing named banks:
``{"format_version": 1, "banks": {"NAME": {"url": "...", "description": "..."}}}`` where each
url is absolute or relative to the index.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import shutil
import stat
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .bank import MANIFEST, Bank, _replace_dir, builtin_banks, installed_banks, installed_banks_dir
from .errors import BankError
from .models import BaseModel, hash_file

logger = logging.getLogger(__name__)

INDEX_FORMAT_VERSION = 1
TIMEOUT_SECONDS = 30.0  # per connection attempt and per read
ATTEMPTS = 3  # tries per file; each retry resumes from the .part file
MAX_JSON_BYTES = 64 << 20  # manifests and indexes are small; this bounds memory on a wrong URL
CHUNK_BYTES = 1 << 16
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".zip")
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass
class PullResult:
    """Summary of one bank installed by ``pull_bank``."""

    name: str  # folder name under the installed banks folder
    path: Path
    bank_id: str
    anchors: int
    source: str  # the URL or path the files came from
    fetched_bytes: int  # bytes transferred in this run (0 when every file was already staged)
    reused_files: int  # files already complete in the staging folder from an earlier run


# ---------------------------------------------------------------------------------------------
# sources

class _LocalSource:
    """A bank folder on this machine (a built-in bank, a folder, or an unpacked archive)."""

    def __init__(self, root: Path, label: str):
        self.root, self.label = root, label

    def read_manifest(self) -> bytes:
        path = self.root / MANIFEST
        if path.is_symlink() or not path.is_file():
            raise BankError(f"{self.label}: no {MANIFEST} (or it is a symbolic link); pass a bank folder, archive or URL.")
        return path.read_bytes()

    def fetch(self, name: str, part: Path, progress) -> int:
        source = self.root / name
        if source.is_symlink():
            raise BankError(f"{self.label}: {name} is a symbolic link; a bank must hold its own files. "
                            "Replace the link with the real file.")
        if not source.is_file():
            raise BankError(f"{self.label}: {name} is missing; the manifest lists it. Rebuild or re-download the bank.")
        total = source.stat().st_size
        with open(source, "rb") as reader, open(part, "wb") as writer:
            done = 0
            for chunk in iter(lambda: reader.read(CHUNK_BYTES), b""):
                writer.write(chunk)
                done += len(chunk)
                progress(name, done, total)
        return total


class _Interrupted(Exception):
    def __init__(self, received: int, total: int | None, reason: str):
        super().__init__(reason)
        self.received, self.total, self.reason = received, total, reason


class _HttpOnlyRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme not in ("http", "https"):
            raise BankError(f"{req.full_url} redirects to {newurl}, which is not http(s); pull from an http(s) URL.")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener() -> urllib.request.OpenerDirector:
    # no file:// or ftp:// handlers: a manifest or redirect can only reach http(s) URLs
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(), urllib.request.UnknownHandler(), urllib.request.HTTPHandler(),
                    urllib.request.HTTPSHandler(), urllib.request.HTTPDefaultErrorHandler(), _HttpOnlyRedirect(),
                    urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


class _RemoteSource:
    """A bank folder served over http(s): ``URL/manifest.json`` and ``URL/<file>``."""

    def __init__(self, url: str, timeout: float):
        self.base = url if url.endswith("/") else url + "/"
        self.label, self.timeout, self.opener = url, timeout, _opener()

    def read_manifest(self) -> bytes:
        return _get_json_bytes(self.opener, urllib.parse.urljoin(self.base, MANIFEST), self.timeout)

    def fetch(self, name: str, part: Path, progress) -> int:
        url = urllib.parse.urljoin(self.base, urllib.parse.quote(name))
        fetched = 0
        for attempt in range(1, ATTEMPTS + 1):
            offset = part.stat().st_size if part.exists() else 0
            try:
                return fetched + self._fetch_once(url, name, part, offset, progress)
            except _Interrupted as exc:
                fetched += max(0, exc.received - offset)
                logger.warning("%s: attempt %d of %d stopped at %d of %s bytes (%s); resuming", name, attempt,
                               ATTEMPTS, exc.received, exc.total or "?", exc.reason)
                last = exc
        raise BankError(f"{name}: download from {url} was interrupted at {last.received} of {last.total or '?'} bytes "
                        f"after {ATTEMPTS} attempts ({last.reason}); run the same `mta-local bank pull` again to "
                        "resume from the .part file.")

    def _fetch_once(self, url: str, name: str, part: Path, offset: int, progress) -> int:
        headers = {"User-Agent": f"mta-local/{__version__}"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            response = self.opener.open(urllib.request.Request(url, headers=headers), timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and offset:
                return 0  # the .part file already contains the whole file, and the sha256 check decides
            raise BankError(f"{name}: HTTP {exc.code} {exc.reason} for {url}; check that the bank URL serves every "
                            "file its manifest lists.") from None
        except (urllib.error.URLError, OSError) as exc:
            raise _Interrupted(offset, None, _reason(exc)) from None

        with response:
            if offset and response.status != 206:
                offset = 0  # the server ignored the Range header and sends the whole file
            elif offset and not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
                part.unlink()  # a range other than the one requested: start the next attempt from zero
                raise _Interrupted(0, None, f"unexpected Content-Range {response.headers.get('Content-Range')!r}")
            length = response.headers.get("Content-Length")
            total = offset + int(length) if length and length.isdigit() else None
            received = offset
            with open(part, "ab" if offset else "wb") as writer:
                while True:
                    try:
                        chunk = response.read(CHUNK_BYTES)
                    except (http.client.HTTPException, OSError) as exc:
                        raise _Interrupted(received, total, _reason(exc)) from None
                    if not chunk:
                        break
                    writer.write(chunk)
                    received += len(chunk)
                    progress(name, received, total)
            # http.client returns a short body without an error when the server closes early
            if total is not None and received < total:
                raise _Interrupted(received, total, "the server closed the connection early")
        return received - offset


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or exc
    return f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__


def _get_json_bytes(opener, url: str, timeout: float) -> bytes:
    try:
        with opener.open(urllib.request.Request(url, headers={"User-Agent": f"mta-local/{__version__}"}),
                         timeout=timeout) as response:
            data = response.read(MAX_JSON_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise BankError(f"{url}: HTTP {exc.code} {exc.reason}; check the bank or index URL.") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise BankError(f"{url}: download failed ({_reason(exc)}); check the URL and the network, then run the pull again.") from None
    if len(data) > MAX_JSON_BYTES:
        raise BankError(f"{url}: larger than {MAX_JSON_BYTES >> 20} MB, so not a bank manifest or index; check the URL.")
    return data


def _parse_json(data: bytes, label: str) -> dict:
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BankError(f"{label}: not valid JSON ({exc}); check that the URL or path points at a bank.") from None
    if not isinstance(value, dict):
        raise BankError(f"{label}: expected a JSON object; check that the URL or path points at a bank.")
    return value


def resolve_index(index_url: str, name: str | None, timeout: float = TIMEOUT_SECONDS) -> tuple[str, str]:
    """Read a bank index and return (bank name, bank URL) for ``name``, or for its only bank."""
    _check_url(index_url)
    index = _parse_json(_get_json_bytes(_opener(), index_url, timeout), index_url)
    if index.get("format_version") != INDEX_FORMAT_VERSION or not isinstance(index.get("banks"), dict):
        raise BankError(f"{index_url}: not a bank index (expected format_version {INDEX_FORMAT_VERSION} and a "
                        "\"banks\" object); check the --index URL.")
    banks = index["banks"]
    if name is None:
        if len(banks) != 1:
            raise BankError(f"{index_url} lists {len(banks)} banks ({', '.join(sorted(banks))}); "
                            f"pass one: `mta-local bank pull NAME --index {index_url}`.")
        name = next(iter(banks))
    entry = banks.get(name)
    if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
        raise BankError(f"bank {name!r} is not in the index {index_url} (it lists {', '.join(sorted(banks)) or 'none'}); "
                        "pass one of those names.")
    url = urllib.parse.urljoin(index_url, entry["url"])
    _check_url(url)
    return name, url


def _check_url(url: str) -> None:
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise BankError(f"{url}: only http and https URLs are supported; pass an http(s) URL, a folder or an archive.")


# ---------------------------------------------------------------------------------------------
# archives

def _check_member(archive: Path, name: str) -> None:
    parts = Path(name).parts
    if Path(name).is_absolute() or ".." in parts or name.startswith(("/", "\\")) or "\\" in name:
        raise BankError(f"{archive}: archive member {name!r} points outside the archive folder; the archive is "
                        "unsafe to unpack. Get a corrected archive from its publisher.")


def _extract(archive: Path, target: Path) -> None:
    """Unpack a .tar.gz or .zip holding regular files and folders only."""
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as handle:
            for info in handle.infolist():
                _check_member(archive, info.filename)
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise BankError(f"{archive}: archive member {info.filename!r} is a symbolic link; a bank must "
                                    "hold its own files. Get an archive without links.")
            handle.extractall(target)
        return
    with tarfile.open(archive, "r:*") as handle:
        for member in handle.getmembers():
            _check_member(archive, member.name)
            if not (member.isfile() or member.isdir()):
                raise BankError(f"{archive}: archive member {member.name!r} is a link or special file; a bank contains "
                                "regular files only. Get an archive without links.")
        handle.extractall(target, filter="data")


def _bank_root(folder: Path, label: str) -> Path:
    if (folder / MANIFEST).exists():
        return folder
    entries = [entry for entry in folder.iterdir()]
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink() and (entries[0] / MANIFEST).exists():
        return entries[0]
    raise BankError(f"{label}: no {MANIFEST} at the top of the archive or in its single top folder; "
                    "pack the bank folder itself.")


# ---------------------------------------------------------------------------------------------
# pulling

def pull_bank(source: str, base: BaseModel, name: str | None = None, index: str | None = None,
              timeout: float = TIMEOUT_SECONDS, progress=None) -> PullResult:
    """Install a bank into the cache from SOURCE and return what was installed.

    SOURCE is a built-in bank name, a bank folder, a .tar.gz/.tgz/.zip archive of one, an http(s)
    URL of a bank folder, or an http(s) URL ending in index.json. With ``index``, SOURCE is a bank
    name in that index. ``name`` sets the installed name (default: the index name, else the
    manifest's bank_id). ``progress(file_name, done_bytes, total_bytes or None)`` is called as
    bytes arrive.
    """
    progress = progress or (lambda *args: None)
    installed = installed_banks_dir()
    installed.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=installed, prefix=".unpack-") as scratch:
        origin, default_name = _open_source(source, index, timeout, Path(scratch))
        return _pull(origin, base, name or default_name, progress)


def _open_source(source: str, index: str | None, timeout: float, scratch: Path):
    if index is not None:
        index_name, url = resolve_index(index, source, timeout)
        return _RemoteSource(url, timeout), index_name
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", source):
        _check_url(source)
        if urllib.parse.urlsplit(source).path.endswith("index.json"):
            index_name, url = resolve_index(source, None, timeout)
            return _RemoteSource(url, timeout), index_name
        url = source.removesuffix(MANIFEST)
        return _RemoteSource(url, timeout), None
    path = Path(source).expanduser()
    if path.is_dir():
        return _LocalSource(path, str(path)), None
    if path.is_file():
        if not path.name.endswith(ARCHIVE_SUFFIXES):
            raise BankError(f"{path}: not a bank folder or a {', '.join(ARCHIVE_SUFFIXES)} archive; pass one of those.")
        try:
            _extract(path, scratch)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
            raise BankError(f"{path}: cannot unpack the archive ({exc}); download it again.") from None
        return _LocalSource(_bank_root(scratch, str(path)), str(path)), None
    if source in builtin_banks():
        return _LocalSource(builtin_banks()[source], f"built-in bank {source}"), source
    raise BankError(f"{source!r} is not a built-in bank, folder, archive or http(s) URL "
                    f"(built-in: {', '.join(builtin_banks()) or 'none'}); pass one of those, or NAME --index URL.")


def _pull(origin, base: BaseModel, name: str | None, progress) -> PullResult:
    manifest_bytes = origin.read_manifest()
    manifest = _parse_json(manifest_bytes, f"{origin.label} {MANIFEST}")
    name = name or manifest.get("bank_id")
    if not isinstance(name, str) or not _NAME_PATTERN.match(name):
        raise BankError(f"{origin.label}: {name!r} cannot name an installed bank (letters, digits, '.', '_', '-'); "
                        "pass --name NAME.")

    with _name_lock(name):
        return _pull_locked(origin, base, name, manifest, manifest_bytes, progress)


@contextmanager
def _name_lock(name: str):
    """Hold an exclusive lock on an installed bank name, so two pulls never share one staging folder."""
    path = installed_banks_dir() / f".{name}.lock"
    with open(path, "a+b") as handle:
        try:
            _lock_file(handle)
            # the previous holder deletes the file when done, and a lock on a deleted file protects nothing
            if os.stat(path).st_ino != os.fstat(handle.fileno()).st_ino:
                raise OSError
        except OSError:
            raise BankError(f"another `mta-local bank pull` or `bank remove` of {name!r} is running (it has locked {path}); "
                            "wait for it to finish, then run this command again.") from None
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # still locked here; the lock itself ends with the file or the process


def _lock_file(handle) -> None:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
    else:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def _pull_locked(origin, base: BaseModel, name: str, manifest: dict, manifest_bytes: bytes, progress) -> PullResult:
    # validate the manifest (format, file names) in the staging folder before fetching any file
    staging = installed_banks_dir() / f".{name}.pull"
    staging.mkdir(parents=True, exist_ok=True)
    (staging / MANIFEST).write_bytes(manifest_bytes)
    bank = Bank(staging, label=origin.label)

    fetched, reused = 0, 0
    for anchor in bank.anchors:
        target = staging / anchor["file"]
        if target.is_file() and hash_file(target) == anchor["sha256"]:
            reused += 1
            continue
        part = target.with_name(target.name + ".part")
        if isinstance(origin, _LocalSource):
            part.unlink(missing_ok=True)
        resumed = part.exists()
        fetched += origin.fetch(anchor["file"], part, progress)
        digest = hash_file(part)
        if digest != anchor["sha256"] and resumed:
            # the .part file may come from an older version of the bank on the server
            logger.warning("%s: sha256 mismatch after resuming a .part file; downloading it again from the start", anchor["file"])
            part.unlink()
            fetched += origin.fetch(anchor["file"], part, progress)
            digest = hash_file(part)
        if digest != anchor["sha256"]:
            part.unlink()
            raise BankError(f"{anchor['file']} from {origin.label}: sha256 {digest[:12]}... does not match the "
                            f"manifest's {anchor['sha256'][:12]}...; the copy there is corrupt or was changed. "
                            "Pull from another source or ask its publisher to rebuild the bank.")
        os.replace(part, target)

    # drop files an earlier pull of another version of this bank left behind
    listed = {MANIFEST} | {anchor["file"] for anchor in bank.anchors}
    for leftover in staging.iterdir():
        if leftover.name in listed:
            continue
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()

    bank.check_base_model(base)
    target = installed_banks_dir() / name
    _replace_dir(staging, target)
    logger.info("installed bank %s (%d anchors) from %s into %s", bank.bank_id, len(bank.anchors), origin.label, target)
    return PullResult(name=name, path=target, bank_id=bank.bank_id, anchors=len(bank.anchors), source=origin.label,
                      fetched_bytes=fetched, reused_files=reused)


def remove_bank(name: str) -> Path:
    """Delete an installed bank and any staged pull of it; return the folder removed."""
    target = installed_banks_dir() / name
    if not _NAME_PATTERN.match(name) or not target.is_dir():
        if name in builtin_banks():
            raise BankError(f"{name} is a built-in bank; it ships with mta-local and cannot be removed.")
        raise BankError(f"no installed bank {name!r} (installed: {', '.join(installed_banks()) or 'none'}); "
                        "see `mta-local bank list`.")
    with _name_lock(name):
        shutil.rmtree(target)
        shutil.rmtree(installed_banks_dir() / f".{name}.pull", ignore_errors=True)
    return target
