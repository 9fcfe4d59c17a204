"""Checksum-pinned downloads and safe archive extraction for the public datasets.

``data_scripts/download_<name>.py`` are thin wrappers around :func:`main`; every fact about a
dataset's files (URL, file name, size, checksums and where they came from, licence) lives in
:data:`SOURCES`, nowhere else.

* :func:`download` fetches a URL with :func:`pooch.retrieve`: the data is streamed (with a
  progress bar) into a temporary file beside the destination, checked against the pinned
  checksum(s) and only then moved into place. A mismatch deletes the file and raises
  :class:`ChecksumError` showing the expected and the computed value. Where nothing is pinned the
  computed SHA-256 is printed and a warning says the file could not be verified.
* :func:`safe_extract` checks every member of a zip or tar(.gz) archive *before* anything is
  written (no absolute paths, no ``..``, no link pointing outside the target; tar members also
  pass :func:`tarfile.data_filter`, which refuses device files), extracts into a temporary folder
  beside the target and renames it into place.

Checksums are never invented: each pinned value below names its source. Zenodo publishes an MD5
per file; the SHA-256 values were published by other projects that download the same files and
are cross-checked where a second source exists (see ``checksum_source``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import stat
import sys
import tarfile
import uuid
import warnings
import zipfile
from pathlib import Path, PurePosixPath
from typing import Optional

import requests

from .io import DataError, sha256sum

CHUNK_SIZE = 1 << 20  # 1 MiB per read from the network
TIMEOUT = (15, 120)  # seconds: (connect, read between two chunks)


class ChecksumError(DataError):
    """A downloaded file does not match its pinned checksum (the file was deleted)."""


# ----------------------------------------------------------------------------------- the sources
# One entry per dataset. ``files``: fetched in order; ``extract_to`` (archives only) is the folder,
# relative to the download folder, the archive is unpacked into; ``raw`` is what to pass as
# ``--raw`` to the matching prepare script.
SOURCES: dict = {
    "hc18": {
        "title": "HC18: Automated measurement of fetal head circumference using 2D ultrasound images",
        "record": "https://zenodo.org/records/1327317",
        "doi": "10.5281/zenodo.1327317",
        "license": "CC BY 4.0 (Zenodo record metadata; cite van den Heuvel et al., PLoS ONE 2018)",
        "files": [
            {
                "url": "https://zenodo.org/records/1327317/files/training_set.zip?download=1",
                "filename": "training_set.zip",
                "size": 132_926_838,
                "md5": "00eb8198b9a505b2b3a6dfc740382497",
                "sha256": "fd20d7909df892cfbdc0850de18072dbdad4dc3bc0a57202d4cc818d4715de36",
                "extract_to": "hc18",
            },
            {
                "url": "https://zenodo.org/records/1327317/files/training_set_pixel_size_and_HC.csv?download=1",
                "filename": "hc18/training_set_pixel_size_and_HC.csv",
                "size": 33_688,
                "md5": "c0761518fece2bd2d2ad4218f2cd9777",
                "sha256": "1c08fa81c374c5f9509f3aa6a6568e4dc6cc5434ff82d0df731db7e4f25816b3",
            },
        ],
        "checksum_source": (
            "MD5: the Zenodo record's per-file checksums, as validated against the Zenodo API by a public "
            "download script (file sizes 132,926,838 and 33,688 bytes). SHA-256 of training_set.zip: "
            "published by torch-em (torch_em/data/datasets/medical/hc18.py) and, independently, by the same "
            "download script; SHA-256 of the CSV: that script only."
        ),
        "raw": "hc18",
        "prepare": ["python data_scripts/prepare_hc18.py --raw {raw} --out DATA_ROOT"],
        "note": "Only the 999 training images have annotations; the test set (no labels) is not downloaded.",
    },
    "chaos": {
        "title": "CHAOS - Combined (CT-MR) Healthy Abdominal Organ Segmentation, training set (v1.03)",
        "record": "https://zenodo.org/records/3431873",
        "doi": "10.5281/zenodo.3431873",
        "license": (
            "CC BY-NC-SA 4.0 (the challenge rules, chaos.grand-challenge.org/Rules: non-commercial use only; "
            "cite the data DOI and Kavur et al., Medical Image Analysis 69 (2021) 101950)"
        ),
        "files": [
            {
                "url": "https://zenodo.org/records/3431873/files/CHAOS_Train_Sets.zip?download=1",
                "filename": "CHAOS_Train_Sets.zip",
                "size": 890_771_694,
                "md5": "df21053002a1cc86df918a87da3b2c19",
                "sha256": "535f7d3417a0e0f0d9133fb3d962423d2a9cf3f103e4f09a3d8a1daf87d5d2fc",
                "extract_to": "CHAOS_Train_Sets",
            },
        ],
        "checksum_source": (
            "MD5: the Zenodo record's checksum as quoted ('official MD5') by several public projects that "
            "downloaded v1.03 (890,771,694 bytes). SHA-256: published by torch-em "
            "(torch_em/data/datasets/medical/chaos.py) and, independently, recorded next to that MD5 by one "
            "of those projects."
        ),
        "raw": ".",
        "prepare": [
            "python data_scripts/prepare_chaos.py --raw {raw} --out DATA_ROOT --modality ct",
            "python data_scripts/prepare_chaos.py --raw {raw} --out DATA_ROOT --modality mr",
        ],
        "note": "About 0.9 GB download, 20 CT + 20 MR patients; the test set (no labels) is not downloaded.",
    },
    "psfhs": {
        "title": "PSFHS: intrapartum ultrasound images of pubic symphysis and fetal head",
        "record": "https://zenodo.org/records/10969427",
        "doi": "10.5281/zenodo.10969427",
        "license": (
            "CC BY 4.0 (as reported by public dataset lists; not checked against the Zenodo page from here; "
            "cite Chen et al., Scientific Data 11, 436 (2024))"
        ),
        "files": [
            {
                "url": "https://zenodo.org/records/10969427/files/PSFHS.zip?download=1",
                "filename": "PSFHS.zip",
                "size": None,
                "md5": None,  # Zenodo's MD5 for this file was not found in any source we could read
                "sha256": "3f4a8126c84640e4d1b8a4e296d0dfd599cea6529b64b9ee00e5489bfd17ea95",
                "extract_to": "psfhs",
            },
        ],
        "checksum_source": (
            "SHA-256: published by torch-em (torch_em/data/datasets/medical/psfhs.py); a single source, not "
            "cross-checked against Zenodo's MD5."
        ),
        "raw": "psfhs",
        "prepare": ["python data_scripts/prepare_psfhs.py --raw {raw} --out DATA_ROOT"],
        "note": "The archive holds PSFHS/image_mha/*.mha and PSFHS/label_mha/*.mha; prepare needs SimpleITK "
                "(pip install -e '.[psfhs]').",
    },
}


# ------------------------------------------------------------------------------------ downloads
def _mismatches(computed: dict, sha256: Optional[str], md5: Optional[str]) -> list:
    return [f"{name} expected {expected.lower()}, computed {computed[key]}"
            for name, key, expected in (("SHA-256", "sha256", sha256), ("MD5", "md5", md5))
            if expected and computed[key] != expected.lower()]


class _Stream:
    """A pooch downloader: streams ``url`` into pooch's temporary file with a progress bar, hashing
    as it goes, and refuses a short transfer or a checksum mismatch (pooch then deletes the file)."""

    def __init__(self, get, timeout, chunk_size: int, desc: str, dest: Path, sha256, md5):
        self.get, self.timeout, self.chunk_size, self.desc = get, timeout, chunk_size, desc
        self.dest, self.sha256, self.md5, self.received, self.digests = dest, sha256, md5, 0, {}

    def __call__(self, url: str, output_file: str, pooch=None, check_only: bool = False) -> None:
        from tqdm.auto import tqdm

        hashers = {"sha256": hashlib.sha256(), "md5": hashlib.md5()}
        response = self.get(url, stream=True, timeout=self.timeout)
        try:
            response.raise_for_status()
            length = (response.headers or {}).get("Content-Length")
            total = int(length) if length not in (None, "") else None
            with open(output_file, "wb") as fh, tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                                     desc=self.desc, leave=False) as bar:
                for chunk in response.iter_content(chunk_size=self.chunk_size):
                    fh.write(chunk)
                    for h in hashers.values():
                        h.update(chunk)
                    self.received += len(chunk)
                    bar.update(len(chunk))
        finally:
            close = getattr(response, "close", None)
            if callable(close):
                close()
        if total is not None and self.received != total:
            raise DataError(f"{url}: download incomplete, received {self.received} of {total} bytes "
                            f"(the partial file was deleted; run again)")
        self.digests = {name: h.hexdigest() for name, h in hashers.items()}
        bad = _mismatches(self.digests, self.sha256, self.md5)
        if bad:
            raise ChecksumError(f"{self.dest.name} from {url} failed verification: {'; '.join(bad)}. "
                                f"The downloaded file was deleted.")


def download(url: str, dest: os.PathLike, sha256: Optional[str] = None, md5: Optional[str] = None,
             desc: Optional[str] = None, *, session=None, timeout=TIMEOUT, chunk_size: int = CHUNK_SIZE) -> Path:
    """Download ``url`` to ``dest``, checked against the pinned ``sha256`` and/or ``md5``.

    :func:`pooch.retrieve` moves the file into place only once it verified (both checksums when
    both are pinned); on a mismatch, a truncated transfer or any error the temporary file is
    deleted. If ``dest`` already exists and verifies, nothing is downloaded. With no checksum
    pinned the computed SHA-256 is printed and a warning says the file could not be verified.
    ``session``: anything with a requests-like ``get`` (defaults to :func:`requests.get`).
    Returns ``dest``.
    """
    import pooch

    dest = Path(dest)
    pinned = bool(sha256 or md5)
    if dest.exists():
        computed = {"sha256": sha256sum(dest) if sha256 or not pinned else "",
                    "md5": pooch.file_hash(str(dest), alg="md5") if md5 else ""}
        if not pinned:
            print(f"{dest} already exists; SHA-256 {computed['sha256']}")
            warnings.warn(f"{dest}: no checksum is pinned for {url}, so the existing file could not be "
                          f"verified (SHA-256 {computed['sha256']})", stacklevel=2)
            return dest
        if not _mismatches(computed, sha256, md5):
            print(f"{dest} already exists and matches its pinned checksum; not downloading it again")
            return dest
        warnings.warn(f"{dest} exists but does not match its pinned checksum; downloading it again", stacklevel=2)
        dest.unlink()
    print(f"downloading {url} to {dest}")
    stream = _Stream(session.get if session is not None else requests.get, timeout, chunk_size,
                     desc or dest.name, dest, sha256, md5)
    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel("WARNING")  # our own messages say what happened (pooch's mention its own API)
    try:
        pooch.retrieve(url, known_hash=f"sha256:{sha256}" if sha256 else None, fname=dest.name,
                       path=dest.parent, downloader=stream)
    finally:
        logger.setLevel(level)
    if pinned:
        print(f"{dest}: {stream.received} bytes, checksum verified")
    else:
        print(f"{dest}: {stream.received} bytes, SHA-256 {stream.digests['sha256']} (MD5 {stream.digests['md5']})")
        warnings.warn(f"{dest}: no checksum is pinned for {url}, so the download could not be verified; "
                      f"computed SHA-256 {stream.digests['sha256']}", stacklevel=2)
    return dest


# ----------------------------------------------------------------------------------- extraction
def _check_member_path(archive: Path, name: str, target: Path) -> None:
    """Raise DataError unless the member name is a plain relative path that stays inside target."""
    norm = name.replace("\\", "/")
    pure = PurePosixPath(norm)
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":") or pure.is_absolute():
        raise DataError(f"{archive}: member {name!r} has an absolute path; refusing to extract anything")
    if ".." in pure.parts:
        raise DataError(f"{archive}: member {name!r} contains '..'; refusing to extract anything")
    resolved = (target / norm).resolve()
    if not resolved.is_relative_to(target.resolve()):
        raise DataError(f"{archive}: member {name!r} would be written outside {target}; "
                        f"refusing to extract anything")


def _check_zip_symlink(archive: Path, name: str, link: str, target: Path) -> None:
    norm = link.replace("\\", "/")
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        raise DataError(f"{archive}: member {name!r} is a symlink to the absolute path {link!r}; "
                        f"refusing to extract anything")
    resolved = ((target / name.replace("\\", "/")).parent / norm).resolve()
    if not resolved.is_relative_to(target.resolve()):
        raise DataError(f"{archive}: member {name!r} is a symlink pointing outside the target ({link!r}); "
                        f"refusing to extract anything")


def _check_zip(archive: Path, zf: zipfile.ZipFile, target: Path) -> None:
    for info in zf.infolist():
        _check_member_path(archive, info.filename, target)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            # zipfile writes a symlink member as a small file holding the link text; still refuse
            # one that points outside, as it would after extraction with other tools.
            _check_zip_symlink(archive, info.filename, zf.read(info).decode("utf-8", "replace"), target)


_TAR_REFUSALS = {  # tarfile.data_filter's errors, in the words of the zip checks
    "AbsoluteLinkError": "is a link to an absolute path",
    "LinkOutsideDestinationError": "is a link pointing outside the target",
    "SpecialFileError": "is a device or special file",
}


def _check_tar(archive: Path, tf: tarfile.TarFile, target: Path) -> list:
    """Every member through the checks shared with zip files (the data filter would quietly strip a
    leading '/'), then through :func:`tarfile.data_filter` (links, devices, modes)."""
    if not hasattr(tarfile, "data_filter"):
        raise DataError(f"{archive}: extracting a tar archive safely needs tarfile's 'data' filter "
                        f"(Python >= 3.10.12, 3.11.4 or 3.12); upgrade Python or unpack it by hand")
    members = tf.getmembers()
    for m in members:
        _check_member_path(archive, m.name, target)
        try:
            tarfile.data_filter(m, str(target))
        except tarfile.FilterError as e:
            reason = _TAR_REFUSALS.get(type(e).__name__, f"is refused by tarfile's data filter ({e})")
            link = f" ({m.linkname!r})" if m.linkname else ""
            raise DataError(f"{archive}: member {m.name!r} {reason}{link}; refusing to extract anything") from None
    return members


def safe_extract(archive: os.PathLike, target: os.PathLike, overwrite: bool = False) -> Path:
    """Extract a zip or tar(.gz/.bz2/.xz) ``archive`` into the new folder ``target``.

    Every member is checked before anything is written: absolute paths, ``..`` components and
    (sym/hard) links pointing outside ``target`` raise :class:`DataError` naming the member. The
    archive is unpacked into a temporary folder beside ``target`` and renamed into place, so a
    failure leaves nothing behind. An existing ``target`` is replaced only if ``overwrite``.
    """
    archive, target = Path(archive), Path(target)
    if not archive.is_file():
        raise DataError(f"archive not found: {archive}")
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True (--force) to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.extract-{uuid.uuid4().hex[:8]}"
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                _check_zip(archive, zf, tmp)
                tmp.mkdir()
                zf.extractall(tmp)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive, "r:*") as tf:
                members = _check_tar(archive, tf, tmp)
                tmp.mkdir()
                tf.extractall(tmp, members=members, filter="data")
        else:
            raise DataError(f"{archive}: not a zip or tar archive")
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _is_archive(name: str) -> bool:
    return name.lower().endswith((".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz"))


# ------------------------------------------------------------------------------- command line
def fetch(name: str, out: os.PathLike, force: bool = False) -> Path:
    """Download (and unpack) every file of ``SOURCES[name]`` into ``out``; returns the --raw folder."""
    if name not in SOURCES:
        raise KeyError(f"no download source for {name!r}; known: {', '.join(SOURCES)}")
    source, out = SOURCES[name], Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for f in source["files"]:
        dest = out / f["filename"]
        if force and dest.exists():
            dest.unlink()
        download(f["url"], dest, sha256=f.get("sha256"), md5=f.get("md5"), desc=f"{name}: {dest.name}")
        if f.get("extract_to") and _is_archive(dest.name):
            target = out / f["extract_to"]
            if target.exists() and not force:
                print(f"{target} already exists; not extracting {dest.name} again (--force to redo)")
            else:
                print(f"extracting {dest.name} into {target} ...")
                safe_extract(dest, target, overwrite=force)
    return (out / source["raw"]).resolve() if source["raw"] != "." else out.resolve()


def main(name: str, argv: Optional[list] = None) -> int:
    """Command line of ``data_scripts/download_<name>.py``."""
    source = SOURCES[name]
    parser = argparse.ArgumentParser(
        prog=f"download_{name}.py",
        description=f"Download {source['title']} from {source['record']} (checksum-pinned) and unpack it.",
    )
    parser.add_argument("--out", type=Path, required=True, help="RAW: folder the files are downloaded into")
    parser.add_argument("--force", action="store_true", help="download and unpack again even if present")
    args = parser.parse_args(argv)
    print(f"{source['title']}\n  record:  {source['record']} (doi:{source['doi']})\n  licence: {source['license']}")
    try:
        raw = fetch(name, args.out, force=args.force)
    except (DataError, FileExistsError, OSError, requests.RequestException) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\n{source['note']}\nNext, convert it into the common format:")
    for line in source["prepare"]:
        print("  " + line.format(raw=raw))
    return 0
