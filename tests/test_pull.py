"""Pulling banks from a real HTTP server on 127.0.0.1, from folders and archives; removing them."""

import hashlib
import http.server
import io
import json
import shutil
import tarfile
import threading
import zipfile

import pytest
from click.testing import CliRunner

from mta_local.bank import Bank, builtin_banks, open_bank
from mta_local.cli import cli
from mta_local.errors import BankError
from mta_local.models import resolve_base_model

ANCHOR = "anchor-000.safetensors"


@pytest.fixture
def bank_cache(tmp_path, monkeypatch):
    """Keep installed banks of each test apart from the session-wide cache."""
    monkeypatch.setenv("MTA_LOCAL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "banks"


@pytest.fixture
def small_bank(tmp_path):
    """The LaMP-2 movie bank cut down to its first anchor (4.9 MB)."""
    source = builtin_banks()["lamp2-movies"]
    target = tmp_path / "served" / "movies-1"
    target.mkdir(parents=True)
    manifest = json.loads((source / "manifest.json").read_text())
    manifest["bank_id"] = "movies-1"
    manifest["anchors"] = manifest["anchors"][:1]
    shutil.copyfile(source / ANCHOR, target / ANCHOR)
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


class BankHandler(http.server.BaseHTTPRequestHandler):
    """Serves files under server.root with Range support; server.mode changes how the anchor is served."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        path = server.root / self.path.lstrip("/")
        if not path.is_file() or (server.mode == "404" and path.name == ANCHOR):
            self.send_error(404)
            return
        data = path.read_bytes()
        start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
        if start >= len(data) and start:
            self.send_error(416)
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        cut = path.name == ANCHOR and (server.mode == "truncated" or (server.mode == "cut-once" and not server.cut_done))
        if cut:
            # cut-once sends a third of the file, truncated half of what remains, then the connection closes
            server.cut_done = True
            end = start + len(data) // 3 if server.mode == "cut-once" else start + (len(data) - start) // 2
            self.wfile.write(data[start:end])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(data[start:])


@pytest.fixture
def server(tmp_path, small_bank):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), BankHandler)
    httpd.root, httpd.mode, httpd.cut_done, httpd.requests = small_bank.parent, "normal", False, []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def pull(*args):
    return CliRunner().invoke(cli, ["bank", "pull", *args, "--silent", "--timeout", "10"], catch_exceptions=False)


def error_line(result):
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def edit_manifest(folder, **anchor_fields):
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["anchors"][0].update(anchor_fields)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_pull_url_installs(server, bank_cache):
    result = pull(f"{server.url}/movies-1/")

    assert result.exit_code == 0, result.output
    assert "bank movies-1 (1 anchors" in result.stdout
    assert (bank_cache / "movies-1" / ANCHOR).is_file()
    assert not (bank_cache / ".movies-1.pull").exists()


def test_pulled_bank_opens_by_name(server, bank_cache):
    assert pull(f"{server.url}/movies-1").exit_code == 0

    bank = open_bank("movies-1", task="movie_tagging")

    bank.check_compatible(resolve_base_model(), "all-MiniLM-L6-v2")
    assert bank.path == bank_cache / "movies-1"
    assert bank.load_anchor(bank.anchors[0]["id"]).rank == 8


def test_list_info_remove(server, bank_cache):
    assert pull(f"{server.url}/movies-1/", "--name", "mine").exit_code == 0
    runner = CliRunner()

    listed = runner.invoke(cli, ["bank", "list"], catch_exceptions=False)
    info = runner.invoke(cli, ["bank", "info", "mine"], catch_exceptions=False)
    removed = runner.invoke(cli, ["bank", "remove", "mine"], catch_exceptions=False)
    again = runner.invoke(cli, ["bank", "remove", "mine"], catch_exceptions=False)

    assert "mine\tinstalled\tmovie_tagging\t1 anchors" in listed.stdout
    assert "lamp2-movies\tbuilt-in" in listed.stdout
    assert json.loads(info.stdout)["bank_id"] == "movies-1"
    assert removed.exit_code == 0
    assert not (bank_cache / "mine").exists()
    assert again.exit_code == 1
    assert "no installed bank 'mine'" in error_line(again)


def test_remove_builtin_rejected(bank_cache):
    result = CliRunner().invoke(cli, ["bank", "remove", "lamp2-movies"], catch_exceptions=False)

    assert result.exit_code == 1
    assert "is a built-in bank" in error_line(result)


def test_pull_resumes_after_cut(server, bank_cache):
    server.mode = "cut-once"

    result = pull(f"{server.url}/movies-1/")

    ranges = [r for path, r in server.requests if path.endswith(ANCHOR)]
    size = (server.root / "movies-1" / ANCHOR).stat().st_size
    assert result.exit_code == 0, result.output
    assert ranges == [None, f"bytes={size // 3}-"]
    assert Bank(bank_cache / "movies-1").load_anchor("lamp2-movies/8000002").rank == 8


def test_interrupted_pull_resumes_next_run(server, bank_cache, small_bank):
    assert pull(str(small_bank)).exit_code == 0
    server.mode = "truncated"

    failed = pull(f"{server.url}/movies-1/")
    old = Bank(bank_cache / "movies-1")
    part = bank_cache / ".movies-1.pull" / (ANCHOR + ".part")
    part_size = part.stat().st_size
    server.mode, server.requests = "normal", []
    resumed = pull(f"{server.url}/movies-1/")

    assert failed.exit_code == 1
    assert "interrupted" in error_line(failed)
    assert "run the same `mta-local bank pull` again" in error_line(failed)
    assert old.load_anchor(old.anchors[0]["id"]).rank == 8
    assert resumed.exit_code == 0, resumed.output
    assert (f"/movies-1/{ANCHOR}", f"bytes={part_size}-") in server.requests


def test_stale_part_downloaded_again(server, bank_cache):
    staging = bank_cache / ".movies-1.pull"
    staging.mkdir(parents=True)
    (staging / (ANCHOR + ".part")).write_bytes(b"an older version of the file")

    result = pull(f"{server.url}/movies-1/")

    ranges = [r for path, r in server.requests if path.endswith(ANCHOR)]
    assert result.exit_code == 0, result.output
    assert ranges == ["bytes=28-", None]
    assert Bank(bank_cache / "movies-1").load_anchor("lamp2-movies/8000002").rank == 8


def write_junk(folder):
    junk = b"not a safetensors file\n" * 100
    (folder / ANCHOR).write_bytes(junk)
    edit_manifest(folder, sha256=hashlib.sha256(junk).hexdigest())


FAILURES = [
    # (name, server mode, change to the served bank, words the error must contain)
    ("404", "404", None, ["anchor-000.safetensors", "HTTP 404", "check that the bank URL serves every file"]),
    ("truncated", "truncated", None, ["anchor-000.safetensors", "interrupted", "run the same"]),
    ("checksum", "normal", lambda f: edit_manifest(f, sha256="0" * 64), ["anchor-000.safetensors", "does not match", "Pull from another source"]),
    ("traversal", "normal", lambda f: edit_manifest(f, file="../outside.safetensors"), ["'../outside.safetensors'", "inside the bank folder", "rebuild it"]),
    ("absolute", "normal", lambda f: edit_manifest(f, file="/tmp/outside.safetensors"), ["'/tmp/outside.safetensors'", "inside the bank folder", "rebuild it"]),
    ("not-safetensors", "normal", write_junk, ["anchor-000.safetensors", "not a readable safetensors file", "pull or rebuild"]),
    ("format", "normal", lambda f: (f / "manifest.json").write_text('{"format_version": 7}'), ["format version 7", "upgrade mta-local"]),
]


@pytest.mark.parametrize("name,mode,change,words", FAILURES, ids=[row[0] for row in FAILURES])
def test_failed_pull_keeps_old_bank(server, bank_cache, small_bank, tmp_path, name, mode, change, words):
    assert pull(str(small_bank)).exit_code == 0
    server.mode = mode
    if change:
        change(small_bank)

    result = pull(f"{server.url}/movies-1/", "--name", "movies-1")

    old = Bank(bank_cache / "movies-1")
    assert result.exit_code == 1
    for word in words:
        assert word in error_line(result)
    assert old.load_anchor(old.anchors[0]["id"]).rank == 8
    assert not (tmp_path / "outside.safetensors").exists()
    assert not any(path.endswith("outside.safetensors") for path, _ in server.requests)


def write_index(server, banks):
    (server.root / "index.json").write_text(json.dumps({"format_version": 1, "banks": banks}))


def test_pull_from_index(server, bank_cache):
    write_index(server, {"movies": {"url": "movies-1/"}, "other": {"url": "other/"}})

    result = pull("movies", "--index", f"{server.url}/index.json")

    assert result.exit_code == 0, result.output
    assert (bank_cache / "movies" / ANCHOR).is_file()


@pytest.mark.parametrize("args,words", [
    (["{url}/index.json"], ["lists 2 banks", "movies, other", "--index"]),
    (["nope", "--index", "{url}/index.json"], ["'nope' is not in the index", "movies, other"]),
    (["ftp://127.0.0.1/bank/"], ["only http and https"]),
    (["{url}/missing/"], ["manifest.json", "HTTP 404"]),
], ids=["ambiguous", "unknown-name", "scheme", "no-manifest"])
def test_pull_source_errors(server, bank_cache, args, words):
    write_index(server, {"movies": {"url": "movies-1/"}, "other": {"url": "other/"}})

    result = pull(*[arg.format(url=server.url) for arg in args])

    assert result.exit_code == 1
    for word in words:
        assert word in error_line(result)


def test_pull_index_with_one_bank(server, bank_cache):
    write_index(server, {"movies": {"url": f"{server.url}/movies-1/"}})

    result = pull(f"{server.url}/index.json")

    assert result.exit_code == 0, result.output
    assert (bank_cache / "movies" / "manifest.json").is_file()


def make_archive(small_bank, kind, extra=None):
    path = small_bank.parent / f"movies-1.{kind}"
    if kind == "tar.gz":
        with tarfile.open(path, "w:gz") as archive:
            archive.add(small_bank, arcname="movies-1")
            if extra:
                extra(archive)
    else:
        with zipfile.ZipFile(path, "w") as archive:
            for file in small_bank.iterdir():
                archive.write(file, f"movies-1/{file.name}")
    return path


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_pull_archive(small_bank, bank_cache, kind):
    result = pull(str(make_archive(small_bank, kind)))

    assert result.exit_code == 0, result.output
    assert Bank(bank_cache / "movies-1").anchors[0]["file"] == ANCHOR
    assert [path.name for path in bank_cache.iterdir()] == ["movies-1"]


def add_traversal(archive):
    info = tarfile.TarInfo("../evil.txt")
    info.size = 4
    archive.addfile(info, io.BytesIO(b"evil"))


def add_symlink(archive):
    info = tarfile.TarInfo("movies-1/link.safetensors")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    archive.addfile(info)


@pytest.mark.parametrize("extra,words", [
    (add_traversal, ["'../evil.txt'", "points outside the archive folder"]),
    (add_symlink, ["'movies-1/link.safetensors'", "is a link or special file"]),
], ids=["traversal", "symlink"])
def test_unsafe_archive_rejected(small_bank, bank_cache, extra, words):
    result = pull(str(make_archive(small_bank, "tar.gz", extra)))

    assert result.exit_code == 1
    for word in words:
        assert word in error_line(result)
    assert not (small_bank.parent.parent / "evil.txt").exists()
    assert not (bank_cache / "movies-1").exists()


def test_symlinked_anchor_rejected(small_bank, bank_cache, tmp_path):
    real = tmp_path / "elsewhere.safetensors"
    (small_bank / ANCHOR).rename(real)
    (small_bank / ANCHOR).symlink_to(real)

    result = pull(str(small_bank))

    assert result.exit_code == 1
    assert "anchor-000.safetensors is a symbolic link" in error_line(result)
    with pytest.raises(BankError, match="'anchor-000.safetensors' is a symbolic link"):
        Bank(small_bank)


def test_pull_builtin_name(bank_cache):
    result = pull("lamp2-movies", "--name", "movies-copy")

    assert result.exit_code == 0, result.output
    assert len(open_bank("movies-copy", task="").anchors) == 4


def test_wrong_tensor_shape_rejected(small_bank):
    from safetensors.torch import load_file, save_file

    state = load_file(str(small_bank / ANCHOR))
    key = next(k for k in state if k.endswith("q_proj.lora_A.weight"))
    state[key] = state[key][:, :100].contiguous()
    save_file(state, str(small_bank / ANCHOR))

    with pytest.raises(BankError, match=r"q_proj.lora_A.weight has shape \[8, 100\] but .* needs \[8, 576\]"):
        Bank(small_bank).check_tensors(resolve_base_model())


def test_other_embedder_rejected(small_bank):
    with pytest.raises(BankError, match="built with embedder 'all-MiniLM-L6-v2', not 'other-embedder'"):
        Bank(small_bank).check_compatible(resolve_base_model(), "other-embedder")


def test_concurrent_pull_of_same_name_refused(small_bank, bank_cache):
    import subprocess
    import sys

    bank_cache.mkdir(parents=True, exist_ok=True)
    # another process holds the name's lock, as a running pull does
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"handle = open({str(bank_cache / '.movies-1.lock')!r}, 'a+b')\n"
        "fcntl.flock(handle.fileno(), fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        blocked = pull(str(small_bank))
    finally:
        holder.kill()
        holder.wait()
    after = pull(str(small_bank))

    assert blocked.exit_code == 1
    assert "another `mta-local bank pull` or `bank remove` of 'movies-1' is running" in blocked.output
    assert after.exit_code == 0, after.output  # the lock ends with the process that held it
