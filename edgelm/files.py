"""Small file helpers: UTF-8 text and JSON that fail with a clear message, and writes that never leave half a
file."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgelm.errors import EdgelmError

UTF8_HINT = "convert it first, e.g. iconv -f latin1 -t utf-8"


class NotUtf8Error(EdgelmError):
    """A text file whose bytes are not UTF-8 (a caller may skip such files rather than stop)."""


def read_text(path: Path, label: str | None = None, hint: str = UTF8_HINT, drop_bom: bool = False) -> str:
    """The text of a UTF-8 file (a leading byte-order mark dropped if `drop_bom`); an EdgelmError naming it
    (`label`, default its path) when it is missing, not a file or unreadable, a `NotUtf8Error` ending in
    `hint` when it is not UTF-8."""
    path = Path(path)
    label = label or str(path)
    if not path.exists():
        raise EdgelmError(f"{label}: not found")
    if not path.is_file():
        raise EdgelmError(f"{label}: not a file (give a UTF-8 text file)")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise EdgelmError(f"{label}: cannot be read ({e.strerror or e})") from None
    try:
        return data.decode("utf-8-sig" if drop_bom else "utf-8")
    except UnicodeDecodeError as e:
        raise NotUtf8Error(f"{label}: not UTF-8 (byte {e.start}: {e.reason}); {hint}") from None


def read_json(path: Path) -> Any:
    """Parse a JSON file, turning every failure into an EdgelmError that names the file (a FIFO or a
    device is not read: it could block forever)."""
    if Path(path).exists() and not Path(path).is_file():
        raise EdgelmError(f"{path}: not a regular file")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EdgelmError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise EdgelmError(f"{path}: cannot be read ({e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise EdgelmError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary name beside `path`, then rename it into place."""
    path = Path(path)
    tmp = temporary_sibling(path)
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


@contextlib.contextmanager
def new_folders(folder: Path) -> Iterator[None]:
    """Create `folder` and its missing parents for the block; when the block fails, remove those it
    created that are still empty, so that a failed write leaves no empty folder behind."""
    folder = Path(folder)
    missing = [p for p in (folder, *folder.parents) if not p.exists()]  # the deepest first
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for created in missing:
            with contextlib.suppress(OSError):  # not empty: something else wrote there meanwhile
                created.rmdir()
        raise


def temporary_sibling(path: Path) -> Path:
    """A hidden name beside `path` to write to before renaming into place (`is_temporary`)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp")


def is_temporary(path: Path) -> bool:
    """Whether `path` is named as edgelm names what it writes before renaming it (`temporary_sibling`, or
    one with a suffix added after it): what an interrupted run left, never to be read as an artifact."""
    name = Path(path).name
    return name.startswith(".") and (name.endswith(".tmp") or ".tmp." in name)


def human_size(n: float | None) -> str:
    """1234567 → '1.2 MB' (decimal units, as file managers show); None (unknown) → '—'."""
    if n is None:
        return "—"
    units = ["B", "kB", "MB", "GB", "TB"]
    i = 0
    while n >= 1000 and i < len(units) - 1:
        n, i = n / 1000, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"
