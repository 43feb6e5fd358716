"""Atomic file writing and JSONL helpers shared by every stage.

Every file a stage produces is written to a temporary sibling and renamed into place, so a
run killed at any moment leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from distillqa.errors import RunDirError


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing), waiting while another process holds it; the
    OS releases it when the holder dies (kill -9 too)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path, replace_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it onto `path`.

    Works for files and directories. On error the temporary path is removed. An existing file
    at `path` is replaced; an existing non-empty directory only with `replace_dir=True` (which
    callers pass for directories they made themselves: checkpoints, final/, or an output
    `claim_output` recognised as theirs), so nothing a user put there is ever deleted.
    """
    path = Path(path)
    _refuse_foreign(path, replace_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / "out"
    try:
        yield target
        _refuse_foreign(path, replace_dir)  # checked again: the work may have taken a while
        if path.is_dir() and not path.is_symlink():
            os.replace(path, tmp / "old")  # moved aside, removed with tmp once the new one is in place
        elif target.is_dir() and (path.exists() or path.is_symlink()):
            raise RunDirError(f"{path} exists and is not a directory; not replacing it")
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _refuse_foreign(path: Path, replace_dir: bool) -> None:
    if path.is_symlink() and path.is_dir():
        raise RunDirError(f"{path} is a link to a directory; not replacing it")
    if path.is_dir() and not replace_dir and any(path.iterdir()):
        raise RunDirError(f"{path} is a directory that is not empty; not replacing it")


# --- outputs at paths the user names ------------------------------------------------------------
OUTPUT_MARKER = "distillqa_output.json"


def is_empty(path: Path) -> bool:
    """Nothing there, an empty directory or a 0-byte file: nothing to lose."""
    if path.is_symlink():
        return False
    if path.is_dir():
        return not any(path.iterdir())
    return not path.exists() or (path.is_file() and path.stat().st_size == 0)


def _own_dir(path: Path, command: str) -> str | None:
    """Why the directory `path` is not a previous output of `command` (None if it is, unchanged)."""
    try:
        marker = json.loads((path / OUTPUT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"it holds no {OUTPUT_MARKER}"
    if not isinstance(marker, dict) or marker.get("command") != command:
        return f"its {OUTPUT_MARKER} is not from distillqa {command}"
    written = set(marker.get("files") or [])
    extra = sorted(str(p.relative_to(path)) for p in path.rglob("*")
                   if (p.is_file() or p.is_symlink()) and p.name != OUTPUT_MARKER and str(p.relative_to(path)) not in written)
    if extra:
        return f"it holds files distillqa {command} did not write ({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''})"
    return None


def check_output(path: str | Path, command: str, overwrite: bool = False,
                 recognise: Callable[[Path], str | None] | None = None) -> bool:
    """Whether `command` may write its output at `path`; raises RunDirError if it may not.

    A missing path, an empty directory or an empty file may be written. Anything else is refused,
    unless `overwrite` is given and it is recognisably a previous output of the same command: a
    directory holding the marker that `claim_output` writes and no file it did not list, or a file
    that `recognise(path)` accepts (it returns None, or why the file is not one)."""
    path = Path(path)
    if is_empty(path):
        return True
    hint = f"choose another output path, or pass --overwrite to replace a previous output of distillqa {command}"
    if not overwrite:
        raise RunDirError(f"{path} already exists and is not empty; {hint}")
    if path.is_symlink():
        why = "it is a link"
    elif path.is_dir():
        why = "it is a directory" if recognise is not None else _own_dir(path, command)
    else:
        why = recognise(path) if recognise is not None else "it is a file"
    if why:
        raise RunDirError(f"{path} was not written by distillqa {command} ({why}); refusing to replace it, even with --overwrite")
    return True


@contextmanager
def claim_output(path: str | Path, command: str, overwrite: bool = False,
                 recognise: Callable[[Path], str | None] | None = None) -> Iterator[Path]:
    """Yield a fresh path for `command`'s output (a directory, or a file if `recognise` is given);
    on success it is renamed onto `path`, which `check_output` allowed before any work was done
    and checks again before replacing. A directory output gets a marker listing its files, so a
    later `--overwrite` can tell it from anything else."""
    path = Path(path)
    check_output(path, command, overwrite, recognise)
    with atomic_path(path, replace_dir=True) as tmp:
        yield tmp
        check_output(path, command, overwrite, recognise)
        if tmp.is_dir():
            files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
            (tmp / OUTPUT_MARKER).write_text(json.dumps({"command": command, "files": files, "created": time.time()}, indent=1) + "\n",
                                            encoding="utf-8")


def check_claimed_dir(path: str | Path, marker: str, command: str) -> None:
    """A directory a resumable command fills (an experiment) must be new, empty or its own (it holds
    `marker`), so that none of a user's files is overwritten and no lock or config is dropped among them."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"output_dir {path} exists and is not a directory")
    leftovers = [p for p in path.iterdir() if p.name != ".lock"] if path.is_dir() else []  # a killed start leaves .lock
    if leftovers and not (path / marker).is_file():
        raise RunDirError(f"output_dir {path} exists, is not empty and holds no {marker}, so it is not a distillqa "
                          f"{command} directory; choose another output_dir")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSONL file written by distillqa (for user-written input, see distillqa.data)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def append_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """Append rows and fsync, so a partial file holds only whole lines after a crash."""
    with open(path, "a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_partial_jsonl(path: str | Path) -> list[dict]:
    """Read an append-only JSONL file, dropping a torn last line left by a crash."""
    if not Path(path).exists():
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


# --- a resumable output: rows appended to OUT.partial.jsonl, then written in order as OUT --------
def partial_path(out: Path) -> Path:
    return out.with_name(out.stem + ".partial.jsonl")


def resume_partial(out: Path) -> set[str]:
    """The ids of the rows a killed writer of `out` already appended to its partial file, whose torn
    last line (if any) is dropped so that appending can go on."""
    rows = read_partial_jsonl(partial_path(out))
    write_jsonl(partial_path(out), rows)
    return {r["id"] for r in rows}


def finish_partial(out: Path, ids: list[str]) -> None:
    """Write `out` from the partial file's rows in the order of `ids`, then remove the partial file."""
    rows = {r["id"]: r for r in read_partial_jsonl(partial_path(out))}
    write_jsonl(out, [rows[i] for i in ids])
    partial_path(out).unlink()
