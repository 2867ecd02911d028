"""Where the Kaggle LGG download (``kaggle_3m``) is: a folder on disk or a folder in a zip archive.

Accepted inputs (see :func:`find_kaggle_root`): the Kaggle zip archive itself (the manual
directory may be the archive file, e.g. ``archive.zip``, or a folder holding it), the unpacked
archive (which holds the data twice: ``kaggle_3m/`` and ``lgg-mri-segmentation/kaggle_3m/``; the
two copies are checked to be the same and one is read), or a bare ``kaggle_3m`` folder (or a
folder holding it). What is in the folder is checked by :mod:`.kaggle`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import zipfile
from pathlib import Path
from typing import BinaryIO

from unet_jax.lgg import MANUAL_DOWNLOAD_INSTRUCTIONS, LGGDataError, is_hidden

__all__ = ["Source", "as_source", "find_kaggle_root", "open_source"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Source:
    """A ``kaggle_3m`` folder, on disk or inside a zip archive; picklable (for worker processes).

    Attributes:
      root: the folder (a path on disk), or its member prefix inside ``archive`` (``"kaggle_3m"``).
      archive: path of the zip archive, or ``None`` for a folder on disk.
    """

    root: str
    archive: str | None = None

    def describe(self, rel: str = "") -> str:
        """A human-readable location of ``rel`` (relative to the root), for error messages."""
        if self.archive is None:
            return os.path.join(self.root, rel) if rel else self.root
        inner = f"{self.root}/{rel}" if rel else f"{self.root}/"
        return f"{self.archive}!{inner}"

    def open(self, rel: str) -> BinaryIO:
        """Open the file ``rel`` (``/``-separated, relative to the root) for binary reading."""
        if self.archive is None:
            return open(os.path.join(self.root, rel), "rb")
        return _zip(self.archive).open(f"{self.root}/{rel}")

    def exists(self, rel: str) -> bool:
        """Whether the file ``rel`` exists."""
        if self.archive is None:
            return os.path.isfile(os.path.join(self.root, rel))
        return f"{self.root}/{rel}" in _zip_index(self.archive)[1]

    def entries(self) -> dict[str, list[str]]:
        """``{folder: [file names]}`` for the root (key ``""``) and each folder directly in it."""
        if self.archive is None:
            out: dict[str, list[str]] = {"": []}
            with os.scandir(self.root) as it:
                for entry in it:
                    if entry.is_dir():
                        out[entry.name] = sorted(os.listdir(entry.path))
                    else:
                        out[""].append(entry.name)
            out[""].sort()
            return out
        dirs, files = _zip_index(self.archive)
        prefix = f"{self.root}/"
        out = {"": []}
        for d in dirs:
            if d.startswith(prefix) and "/" not in d[len(prefix) :]:
                out.setdefault(d[len(prefix) :], [])
        for f in files:
            if not f.startswith(prefix):
                continue
            rest = f[len(prefix) :]
            parts = rest.split("/")
            if len(parts) == 1:
                out[""].append(rest)
            else:
                out.setdefault(parts[0], [])
                if len(parts) == 2:
                    out[parts[0]].append(parts[1])
                else:  # deeper than a patient folder: reported as an unexpected entry
                    out[parts[0]].append(parts[1] + "/")
        return {k: sorted(set(v)) for k, v in out.items()}


_ZIPS: dict[str, zipfile.ZipFile] = {}
_ZIP_INDEX: dict[str, tuple[frozenset[str], frozenset[str]]] = {}


def _zip(archive: str) -> zipfile.ZipFile:
    # One open handle per archive and process (worker processes open their own).
    zf = _ZIPS.get(archive)
    if zf is None:
        try:
            zf = zipfile.ZipFile(archive)
        except (OSError, zipfile.BadZipFile) as e:
            raise LGGDataError(
                f"{archive}: cannot read the zip archive ({e}; an incomplete download?)"
            ) from e
        _ZIPS[archive] = zf
    return zf


def _zip_index(archive: str) -> tuple[frozenset[str], frozenset[str]]:
    """(folders, files) of an archive; folders include those only implied by file paths."""
    idx = _ZIP_INDEX.get(archive)
    if idx is None:
        dirs, files = set(), set()
        for name in _zip(archive).namelist():
            if name.endswith("/"):
                dirs.add(name.rstrip("/"))
            else:
                files.add(name)
            parts = name.rstrip("/").split("/")
            for i in range(1, len(parts)):
                dirs.add("/".join(parts[:i]))
        idx = (frozenset(dirs), frozenset(files))
        _ZIP_INDEX[archive] = idx
    return idx


def _folder_candidates(manual_dir: Path, max_depth: int = 3) -> list[Path]:
    """Folders (at most ``max_depth`` below ``manual_dir``) that directly hold TCGA_* folders
    with .tif files; the search does not descend into such a folder."""
    found = []

    def holds_patients(d: Path) -> bool:
        try:
            children = [c for c in os.scandir(d) if c.is_dir() and c.name.startswith("TCGA_")]
        except OSError:
            return False
        for c in children:
            try:
                if any(n.endswith(".tif") for n in os.listdir(c.path)):
                    return True
            except OSError:
                continue
        return False

    def walk(d: Path, depth: int) -> None:
        if holds_patients(d):
            found.append(d)
            return
        if depth >= max_depth:
            return
        try:
            subdirs = sorted(e.path for e in os.scandir(d) if e.is_dir() and not is_hidden(e.name))
        except OSError:
            return
        for s in subdirs:
            if not os.path.basename(s).startswith("TCGA_"):
                walk(Path(s), depth + 1)

    walk(manual_dir, 0)
    return found


def _zip_candidates(manual_dir: Path, max_depth: int = 2) -> list[tuple[Path, str]]:
    """(archive, member prefix) of the kaggle_3m-like folders inside zip archives."""
    out = []
    for dirpath, dirnames, filenames in os.walk(manual_dir):
        depth = len(Path(dirpath).relative_to(manual_dir).parts)
        dirnames[:] = [] if depth >= max_depth else [d for d in dirnames if not is_hidden(d)]
        for f in sorted(filenames):
            if not f.lower().endswith(".zip"):
                continue
            archive = str(Path(dirpath) / f)
            out += [(Path(archive), p) for p in _archive_prefixes(archive)]
    return out


def _archive_prefixes(archive: str) -> list[str]:
    """Member prefixes of the kaggle_3m-like folders (holding TCGA_*/*.tif) in an archive."""
    prefixes = set()
    for name in _zip_index(archive)[1]:
        parts = name.split("/")
        if len(parts) >= 3 and parts[-2].startswith("TCGA_") and name.endswith(".tif"):
            prefixes.add("/".join(parts[:-2]))
    return sorted(p for p in prefixes if p)


def _listing(source: Source) -> dict[str, tuple[str, ...]]:
    return {k: tuple(v) for k, v in source.entries().items() if k}


def _pick_copy(sources: list[Source], what: str) -> Source:
    """One of several kaggle_3m copies; they must hold the same folders and files."""
    if len(sources) == 1:
        return sources[0]
    # Prefer the shallowest (the archive's own kaggle_3m/ with the comma-separated data.csv).
    sources = sorted(sources, key=lambda s: (s.root.count("/") + s.root.count(os.sep), s.root))
    first = _listing(sources[0])
    for other in sources[1:]:
        listing = _listing(other)
        if listing != first:
            diff = min(set(first.items()) ^ set(listing.items()))[0]
            raise LGGDataError(
                f"found {len(sources)} copies of the data in {what} that differ (e.g. in patient "
                f"folder {diff!r}): {sources[0].describe()} and {other.describe()}. "
                "Keep only one.\n\n" + MANUAL_DOWNLOAD_INSTRUCTIONS
            )
    log.info(
        "Found %d identical copies of kaggle_3m in %s (as the Kaggle archive unpacks); "
        "reading %s only, so each slice counts once.",
        len(sources),
        what,
        sources[0].describe(),
    )
    return sources[0]


def _archive_source(archive: Path) -> Source:
    """The data inside one zip archive given itself as the manual directory."""
    if archive.suffix.lower() != ".zip" and not zipfile.is_zipfile(archive):
        raise LGGDataError(
            f"{archive} is a file, not a folder or a zip archive: pass the Kaggle zip archive "
            "(archive.zip) or the folder holding the download as --manual_dir"
        )
    found = _archive_prefixes(str(archive))
    if not found:
        raise LGGDataError(
            f"no LGG data found in the zip archive {archive}: expected TCGA_* patient folders "
            "with .tif slices (kaggle_3m) inside it.\n\n" + MANUAL_DOWNLOAD_INSTRUCTIONS
        )
    return _pick_copy([Source(p, str(archive)) for p in found], str(archive))


def open_source(manual_dir: str | os.PathLike) -> Source:
    """Locate the data in ``manual_dir`` (see :func:`find_kaggle_root`) as a :class:`Source`."""
    manual_dir = Path(manual_dir).expanduser()
    if manual_dir.is_file():
        return _archive_source(manual_dir)
    if not manual_dir.is_dir():
        raise LGGDataError(
            f"manual directory {manual_dir} does not exist.\n\n" + MANUAL_DOWNLOAD_INSTRUCTIONS
        )
    folders = _folder_candidates(manual_dir)
    if folders:
        return _pick_copy([Source(str(f)) for f in folders], str(manual_dir))
    zips = _zip_candidates(manual_dir)
    if zips:
        archives = sorted({a for a, _ in zips})
        if len(archives) > 1:
            raise LGGDataError(
                f"found several zip archives with the data in {manual_dir}: "
                f"{', '.join(map(str, archives))}. Keep only one.\n\n"
                + MANUAL_DOWNLOAD_INSTRUCTIONS
            )
        return _pick_copy([Source(p, str(a)) for a, p in zips], str(archives[0]))
    try:
        contents = sorted(os.listdir(manual_dir))
    except OSError:
        contents = []
    shown = ", ".join(contents[:10]) + (", ..." if len(contents) > 10 else "")
    what = f"it holds: {shown}" if contents else "it is empty"
    if any(c.endswith(".tif") for c in contents):
        what += "; this looks like one patient's folder: pass the folder above the patient folders"
    raise LGGDataError(
        f"no LGG data found in the manual directory {manual_dir} ({what}): expected a folder of "
        "TCGA_* patient folders with .tif slices (kaggle_3m) or the Kaggle zip archive.\n\n"
        + MANUAL_DOWNLOAD_INSTRUCTIONS
    )


def find_kaggle_root(manual_dir: str | os.PathLike) -> Path | zipfile.Path:
    """The ``kaggle_3m`` folder inside ``manual_dir``, as users have the download.

    ``manual_dir`` may also be the zip archive itself (as downloaded, e.g. ``archive.zip``).
    Looks (up to three folders deep) for a folder holding ``TCGA_*`` patient folders with .tif
    files: ``manual_dir`` itself, ``manual_dir/kaggle_3m``, or the unpacked archive's two copies
    (``kaggle_3m`` and ``lgg-mri-segmentation/kaggle_3m``, checked to hold the same files; the
    shallower one is used). Failing that, it looks inside ``*.zip`` archives (two levels deep) and
    returns a :class:`zipfile.Path` to the folder inside the archive (read in place).

    Raises:
      LGGDataError: nothing found, the directory is missing, or copies differ (the message repeats
        the download instructions).
    """
    source = open_source(manual_dir)
    if source.archive is None:
        return Path(source.root)
    return zipfile.Path(_zip(source.archive), at=f"{source.root}/")


def as_source(root: Path | zipfile.Path | Source | str | os.PathLike) -> Source:
    """``root`` (a kaggle_3m folder, a :class:`zipfile.Path` into an archive, or a Source) as a
    :class:`Source`."""
    if isinstance(root, Source):
        return root
    if isinstance(root, zipfile.Path):
        return Source(root.at.rstrip("/"), str(root.root.filename))
    return Source(str(root))
