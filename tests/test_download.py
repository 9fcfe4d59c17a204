"""Checksum-pinned downloads and safe extraction, with the network mocked (nothing is downloaded)."""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import zipfile
from pathlib import Path

import pytest

from tskd_utils import download as dl
from tskd_utils.download import ChecksumError, SOURCES, download, safe_extract
from tskd_utils.io import DataError

PAYLOAD = b"public dataset bytes " * 5000  # ~100 kB, a few chunks


class FakeResponse:
    def __init__(self, body: bytes, status: int = 200, length: bool = True):
        self.body, self.status = body, status
        self.headers = {"Content-Length": str(len(body))} if length else {}
        self.closed = False

    def raise_for_status(self):
        if self.status >= 400:
            import requests

            raise requests.HTTPError(f"{self.status} error")

    def iter_content(self, chunk_size=1):
        for i in range(0, len(self.body), chunk_size):
            yield self.body[i : i + chunk_size]

    def close(self):
        self.closed = True


class FakeSession:
    """Stands in for requests: records calls, serves fixed bytes."""

    def __init__(self, body: bytes = PAYLOAD, **kw):
        self.body, self.kw, self.calls = body, kw, []

    def get(self, url, stream=False, timeout=None):
        assert stream and timeout is not None  # streamed, never without a timeout
        self.calls.append(url)
        self.response = FakeResponse(self.body, **self.kw)
        return self.response


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# ------------------------------------------------------------------------------------ download
def test_verified_download_is_renamed_into_place(tmp_path):
    session = FakeSession()
    dest = download("https://example.org/f.zip", tmp_path / "sub" / "f.zip", sha256=sha(PAYLOAD),
                    md5=hashlib.md5(PAYLOAD).hexdigest(), session=session, chunk_size=8192)
    assert dest.read_bytes() == PAYLOAD
    assert sorted(p.name for p in dest.parent.iterdir()) == ["f.zip"]  # no .part left
    assert session.response.closed
    # present and verified: no second request
    download("https://example.org/f.zip", dest, sha256=sha(PAYLOAD), session=session)
    assert len(session.calls) == 1


def test_module_level_requests_get_is_used_by_default(tmp_path, monkeypatch):
    session = FakeSession()
    monkeypatch.setattr(dl.requests, "get", session.get)
    download("https://example.org/g.bin", tmp_path / "g.bin", sha256=sha(PAYLOAD))
    assert session.calls == ["https://example.org/g.bin"]


def test_checksum_mismatch_raises_and_leaves_no_file(tmp_path):
    wrong = "0" * 64
    with pytest.raises(ChecksumError) as err:
        download("https://example.org/f.zip", tmp_path / "f.zip", sha256=wrong, session=FakeSession())
    message = str(err.value)
    assert f"expected {wrong}" in message and f"computed {sha(PAYLOAD)}" in message
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ChecksumError, match="MD5 expected"):
        download("https://example.org/f.zip", tmp_path / "f.zip", md5="1" * 32, session=FakeSession())
    assert list(tmp_path.iterdir()) == []


def test_existing_file_that_fails_verification_is_downloaded_again(tmp_path):
    dest = tmp_path / "f.zip"
    dest.write_bytes(b"stale")
    session = FakeSession()
    with pytest.warns(UserWarning, match="does not match"):
        download("https://example.org/f.zip", dest, sha256=sha(PAYLOAD), session=session)
    assert dest.read_bytes() == PAYLOAD and len(session.calls) == 1


def test_missing_checksum_warns_and_prints_the_hash(tmp_path, capsys):
    with pytest.warns(UserWarning, match="could not be verified"):
        download("https://example.org/f.zip", tmp_path / "f.zip", session=FakeSession())
    assert sha(PAYLOAD) in capsys.readouterr().out
    assert (tmp_path / "f.zip").read_bytes() == PAYLOAD


def test_truncated_transfer_and_http_error_leave_nothing(tmp_path):
    import requests

    class Short(FakeSession):
        def get(self, url, stream=False, timeout=None):
            r = super().get(url, stream, timeout)
            r.headers["Content-Length"] = str(len(PAYLOAD) + 10)
            return r

    with pytest.raises(DataError, match="incomplete"):
        download("https://example.org/f.zip", tmp_path / "f.zip", sha256=sha(PAYLOAD), session=Short())
    with pytest.raises(requests.HTTPError):
        download("https://example.org/f.zip", tmp_path / "f.zip", sha256=sha(PAYLOAD), session=FakeSession(status=404))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------- extraction
def make_zip(path: Path, members: dict) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def make_tar(path: Path, members: list) -> Path:
    """members: (name, bytes) for files, (name, ('sym'|'hard', target)) for links."""
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if isinstance(data, tuple):
                info.type = tarfile.SYMTYPE if data[0] == "sym" else tarfile.LNKTYPE
                info.linkname = data[1]
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def test_safe_extract_good_zip_and_tar_gz(tmp_path):
    z = make_zip(tmp_path / "good.zip", {"Train_Sets/CT/1/a.txt": b"a", "Train_Sets/CT/1/b.txt": b"bb"})
    out = safe_extract(z, tmp_path / "unzipped")
    assert (out / "Train_Sets" / "CT" / "1" / "b.txt").read_bytes() == b"bb"
    t = make_tar(tmp_path / "good.tar.gz", [("PSFHS/image_mha/1.mha", b"x"), ("PSFHS/link", ("sym", "image_mha/1.mha"))])
    out = safe_extract(t, tmp_path / "untarred")
    assert (out / "PSFHS" / "image_mha" / "1.mha").read_bytes() == b"x"
    assert (out / "PSFHS" / "link").resolve() == (out / "PSFHS" / "image_mha" / "1.mha").resolve()
    with pytest.raises(FileExistsError):
        safe_extract(z, tmp_path / "unzipped")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


@pytest.mark.parametrize("kind", ["zip", "tar"])
@pytest.mark.parametrize("evil", ["../evil.txt", "ok/../../evil.txt", "/tmp/evil_abs.txt"])
def test_safe_extract_rejects_escaping_paths_before_writing(tmp_path, kind, evil):
    good = "data/good.txt"
    archive = (make_zip(tmp_path / "a.zip", {good: b"g", evil: b"e"}) if kind == "zip"
               else make_tar(tmp_path / "a.tar.gz", [(good, b"g"), (evil, b"e")]))
    before = set(tmp_path.parent.rglob("*"))
    with pytest.raises(DataError, match=re.escape(repr(evil))):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [archive.name]  # nothing written, not even good.txt
    assert not (tmp_path.parent / "evil.txt").exists() and not Path("/tmp/evil_abs.txt").exists()
    assert set(tmp_path.parent.rglob("*")) == before


@pytest.mark.parametrize("link", [("sym", "../../outside"), ("sym", "/etc/passwd"), ("hard", "../outside")])
def test_safe_extract_rejects_links_pointing_outside(tmp_path, link):
    archive = make_tar(tmp_path / "links.tar.gz", [("data/good.txt", b"g"), ("data/escape", link)])
    with pytest.raises(DataError, match="'data/escape'.*(pointing outside|absolute path)"):
        safe_extract(archive, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["links.tar.gz"]


def test_safe_extract_rejects_device_files_and_needs_the_data_filter(tmp_path, monkeypatch):
    archive = tmp_path / "dev.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        info = tarfile.TarInfo("data/null")
        info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
        tf.addfile(info)
    with pytest.raises(DataError, match="'data/null' is a device or special file"):
        safe_extract(archive, tmp_path / "out")
    good = make_tar(tmp_path / "good.tar.gz", [("data/good.txt", b"g")])
    monkeypatch.delattr(tarfile, "data_filter")  # a Python without extraction filters
    with pytest.raises(DataError, match="'data' filter"):
        safe_extract(good, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dev.tar.gz", "good.tar.gz"]


def test_safe_extract_rejects_escaping_symlink_in_zip(tmp_path):
    archive = tmp_path / "links.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("data/good.txt", b"g")
        info = zipfile.ZipInfo("data/escape")
        info.external_attr = (0o120777 << 16)  # a symlink member; its content is the link target
        zf.writestr(info, "../../../outside")
    with pytest.raises(DataError, match="'data/escape' is a symlink pointing outside"):
        safe_extract(archive, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["links.zip"]


def test_safe_extract_rejects_non_archives(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    with pytest.raises(DataError, match="not a zip or tar"):
        safe_extract(f, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


# --------------------------------------------------------------------------------- the sources
def test_sources_are_complete_and_pinned_from_zenodo_records():
    assert set(SOURCES) == {"hc18", "chaos", "psfhs"}
    for name, source in SOURCES.items():
        assert source["license"] and source["checksum_source"] and source["prepare"]
        for f in source["files"]:
            assert re.fullmatch(r"https://zenodo\.org/records/\d+/files/[^/?]+\?download=1", f["url"]), f["url"]
            assert f["sha256"] is None or re.fullmatch(r"[0-9a-f]{64}", f["sha256"])
            assert f["md5"] is None or re.fullmatch(r"[0-9a-f]{32}", f["md5"])
            assert f["sha256"] or f["md5"], f"{name}: {f['filename']} has no pinned checksum"


def test_download_script_fetches_extracts_and_prints_prepare_command(tmp_path, monkeypatch, capsys):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("PSFHS/image_mha/00001.mha", b"img")
        zf.writestr("PSFHS/label_mha/00001.mha", b"lab")
    body = buf.getvalue()
    session = FakeSession(body)
    monkeypatch.setattr(dl.requests, "get", session.get)
    fake = dict(SOURCES["psfhs"], files=[dict(SOURCES["psfhs"]["files"][0], sha256=sha(body), md5=None)])
    monkeypatch.setitem(SOURCES, "psfhs", fake)
    assert dl.main("psfhs", ["--out", str(tmp_path / "raw")]) == 0
    assert (tmp_path / "raw" / "psfhs" / "PSFHS" / "label_mha" / "00001.mha").read_bytes() == b"lab"
    out = capsys.readouterr().out
    assert f"python data_scripts/prepare_psfhs.py --raw {(tmp_path / 'raw' / 'psfhs').resolve()}" in out
    assert dl.main("psfhs", ["--out", str(tmp_path / "raw")]) == 0  # second run: verified, nothing fetched
    assert len(session.calls) == 1
    # a checksum mismatch is reported as an error, exit status 2, and leaves no file
    monkeypatch.setitem(SOURCES, "psfhs", dict(fake, files=[dict(fake["files"][0], sha256="0" * 64)]))
    assert dl.main("psfhs", ["--out", str(tmp_path / "raw2")]) == 2
    assert "expected 0000" in capsys.readouterr().err
    assert list((tmp_path / "raw2").iterdir()) == []
