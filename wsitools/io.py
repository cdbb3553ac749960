"""Atomic writes and checksums: nothing half-written ever looks finished."""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import socket
import stat
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

from wsitools.errors import DataError, WsiToolsError


TEMP_PREFIX = ".tmp-"
"""Every temporary starts with this, so no glob for finished outputs (``*.zarr``, ``*.h5``) matches it."""


NAME_MAX = 255
"""Longest file name most file systems accept."""


def _host_token() -> str:
    """This machine's name as it appears in temporary names (letters, digits, ``.`` and ``_``)."""
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64] or "localhost"


def temp_sibling(final: Path) -> Path:
    """A temporary path next to ``final`` (same file system, so the rename is atomic).

    The name is ``.tmp-NAME-HOST-PID-RANDOM``: unique per run even when two runs share a process
    id (containers, PID namespaces, two nodes on one shared file system), and it says which host
    and process own it, so the temporaries of dead runs can be told from live ones
    (:func:`temp_owner`). A final name too long to fit is shortened in the temporary's name.
    """
    owner = f"-{_host_token()}-{os.getpid()}-{secrets.token_hex(4)}"
    return final.parent / f"{TEMP_PREFIX}{final.name[: NAME_MAX - len(TEMP_PREFIX) - len(owner)]}{owner}"


@dataclass(frozen=True)
class TempOwner:
    """Who wrote a temporary: the final name it stands for, its host and process id."""

    name: str
    host: str | None
    pid: int | None


_TEMP = re.compile(r"\.tmp-(?P<name>.+)-(?P<host>[A-Za-z0-9._]+)-(?P<pid>[0-9]+)-(?P<rand>[0-9a-f]{8})")
_LEGACY_TEMP = re.compile(r"\.tmp-(?P<name>.+)-(?P<pid>[0-9]+)")
_LEGACY_OUTPUT_SUFFIXES = (".zarr", ".h5")
"""Final names that a temporary of an older wsitools named so stands for on its own: a patch
store, an HDF5 file."""
_RUN_RECORDS = ("run.json", "predict.json")
"""The records of a run folder (``train``, ``predict``): a folder holding one is a wsitools output."""


def temp_owner(path: Path) -> TempOwner | None:
    """The owner encoded in a temporary's name; None if ``path`` is no wsitools temporary.

    Temporaries of older wsitools (``.tmp-NAME-PID``) have no host: they are never provably dead.
    Other tools and people name things so too (``.tmp-thesis-2023``), so such a name is a
    wsitools temporary only where it could be nothing else: ``NAME`` is a patch store or an HDF5
    file (``.zarr``, ``.h5``), or the run folder ``NAME`` (with its ``run.json`` or
    ``predict.json``) is beside it.
    """
    if m := _TEMP.fullmatch(path.name):
        return TempOwner(m["name"], m["host"], int(m["pid"]))
    if (m := _LEGACY_TEMP.fullmatch(path.name)) and (
        m["name"].endswith(_LEGACY_OUTPUT_SUFFIXES)
        or any((path.parent / m["name"] / record).is_file() for record in _RUN_RECORDS)
    ):
        return TempOwner(m["name"], None, None)
    return None


def pid_alive(pid: int) -> bool:
    """True if a process with this id exists on this machine (or cannot be checked)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def provably_dead(path: Path) -> bool:
    """True if ``path`` is a temporary written on this host by a process that no longer exists."""
    owner = temp_owner(path)
    return (
        owner is not None and owner.host == _host_token() and owner.pid is not None
        and owner.pid != os.getpid() and not pid_alive(owner.pid)
    )


def remove_path(path: Path) -> None:
    """Remove a file, link or directory tree; nothing if it is already gone (also on a read-only
    file system, where unlinking a missing name fails with ``EROFS``, not ``ENOENT``)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError:
        if os.path.lexists(path):
            raise


def remove_dead_temps(directory: Path) -> None:
    """Remove the temporaries in ``directory`` that are provably dead.

    Only temporaries of this host whose process is gone are touched: another host's, or a live
    run's, are left alone (``wsitools clean`` removes old ones on a shared file system).
    :func:`atomic_path` sweeps each folder it writes into once per process, so whatever a killed
    run was writing is removed by the next run that writes there.
    """
    for tmp in directory.glob(f"{TEMP_PREFIX}*"):
        if temp_owner(tmp) is not None and provably_dead(tmp):
            remove_path(tmp)


def check_out_apart(out: str | os.PathLike[str], inputs: dict[str, str | os.PathLike[str] | None]) -> None:
    """Refuse an output folder that is one of ``inputs`` ({option: path}) or holds one: a run
    replaces its whole output folder, which would delete them. A :class:`DataError` naming both."""
    out = Path(out)
    target = out.resolve()
    for option, path in inputs.items():
        if path is None:
            continue
        where = Path(path).resolve()
        if where == target or target in where.parents:
            relation = "is" if where == target else "holds"
            raise DataError(
                f"output {out} {relation} {option} {path}: the run replaces its output folder; choose another --out"
            )


def check_own_folder(out: str | os.PathLike[str], *, foreign: Callable[[Path], str | None], writes: str) -> None:
    """Refuse an existing ``out`` that a command writes over but did not make itself, so that it
    never deletes or replaces a user's files: a file, or a folder of which ``foreign`` (given the
    folder) says what shows it is not the command's (None: it is). ``writes`` says what the
    command does to its ``--out``. A missing folder, and one holding nothing but the temporaries
    of earlier runs, are fine. A :class:`DataError` naming the folder and what is wrong."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise DataError(f"{out}: is a file, where a folder is needed; give a folder for --out")
    if all(p.name.startswith(TEMP_PREFIX) for p in out.iterdir()):
        return
    if (problem := foreign(out)) is not None:
        raise DataError(f"{out}: {problem}; {writes}, so give a new or empty folder (or remove this one)")


DESKTOP_FILES = (".DS_Store", "._*", "Thumbs.db", "desktop.ini")
"""Files a desktop's file browser leaves in any folder it shows (glob patterns): never a sign
that a folder is a user's."""


def not_written_by(folder: Path, *, own: Sequence[str], writer: str) -> str | None:
    """What ``folder`` holds that ``writer`` never writes (``own``: glob patterns of the entries
    it writes), in words (``holds docs and 1 more, which train does not write``), or None when it
    holds nothing else: the folder of another run or a user's, whose files a run would overwrite
    or delete. Temporaries of killed writes and :data:`DESKTOP_FILES` count as its own."""
    mine = [*own, f"{TEMP_PREFIX}*", *DESKTOP_FILES]
    foreign = sorted(
        p.name for p in folder.iterdir() if not any(fnmatch.fnmatchcase(p.name, pattern) for pattern in mine)
    )
    if not foreign:
        return None
    more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
    return f"holds {foreign[0]}{more}, which {writer} does not write"


def not_an_output(
    folder: Path, *, record: str, fields: Mapping[str, type], own: Sequence[str], what: str, writer: str
) -> str | None:
    """Why ``folder`` is no ``what`` (``training run``) that ``writer`` (``train``) wrote, in
    words, for :func:`check_own_folder`'s ``foreign``; None when it is one. It is one when its
    ``record`` file is a JSON object holding each of ``fields`` (name -> type of its value:
    another tool or a user may write a file of that name) and it holds nothing else than the
    entries ``writer`` writes (``own``: glob patterns, :func:`not_written_by`)."""
    path = folder / record
    if not path.is_file():
        return f"is no wsitools {what} (it has no {record})"
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        content = None
    if not (isinstance(content, dict) and all(isinstance(content.get(k), t) for k, t in fields.items())):
        return f"is no wsitools {what} (its {record} is not the record of one)"
    return not_written_by(folder, own=[record, *own], writer=writer)


class LostRace(FileExistsError, WsiToolsError):
    """Another run put a finished ``final`` in place while this one was writing it (one line
    for the user: two runs wrote one output at once)."""


def _publish(tmp: Path, final: Path, *, overwrite: bool) -> None:
    """Rename the complete ``tmp`` to ``final`` in one step, never merging into what is there.

    A file is linked into place (fails if ``final`` exists) or, with ``overwrite``, renamed over
    it. A directory is renamed, which fails if a non-empty ``final`` exists; with ``overwrite``
    the old ``final`` is first renamed aside (under a temporary name) and removed afterwards.
    Raises :class:`LostRace` if another run's ``final`` is in the way.
    """
    if tmp.is_dir():
        old = None
        if overwrite and (final.exists() or final.is_symlink()):
            old = temp_sibling(final)
            try:
                os.rename(final, old)
            except FileNotFoundError:  # another run moved it aside first
                old = None
        try:
            os.rename(tmp, final)
        except OSError as exc:
            if final.exists() and exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise LostRace(f"{final}: another run finished it first") from None
            raise
        finally:
            if old is not None:
                remove_path(old)
    elif overwrite:
        os.replace(tmp, final)
    else:
        try:
            os.link(tmp, final)
        except FileExistsError:
            raise LostRace(f"{final}: another run finished it first") from None
        except OSError:  # a file system without hard links
            if final.exists():
                raise LostRace(f"{final}: another run finished it first") from None
            os.rename(tmp, final)
        else:
            tmp.unlink()


_SWEPT: set[str] = set()
"""Folders :func:`atomic_path` and :func:`replaced_together` have removed dead temporaries from
in this process."""


def _sweep_once(folder: Path) -> None:
    """Create ``folder`` and, the first time this process writes there, remove its dead
    temporaries (:func:`remove_dead_temps`)."""
    folder.mkdir(parents=True, exist_ok=True)
    if (swept := os.path.abspath(folder)) not in _SWEPT:
        _SWEPT.add(swept)
        remove_dead_temps(folder)


@contextmanager
def atomic_path(final: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write a file or directory into; rename it to ``final`` on success.

    The temporary is unique to this run (:func:`temp_sibling`). On an exception it is removed and
    ``final`` is left as it was. Without ``overwrite`` an existing ``final`` is never touched:
    :class:`LostRace` (a ``FileExistsError``) says another run got there first. With
    ``overwrite`` an existing ``final`` is replaced only once the new one is complete. The dead
    temporaries of ``final``'s folder (:func:`remove_dead_temps`) are removed first, once per
    process and folder (a listing per write would cost a folder of 40 000 files 26 ms a file).
    An ``OSError`` that names no file (a full disk, as Python's writes report it) is raised
    naming ``final``.
    """
    final = Path(final)
    _sweep_once(final.parent)
    tmp = temp_sibling(final)
    try:
        yield tmp
        if final.exists() and not overwrite:
            raise LostRace(f"{final}: another run finished it first")
        _publish(tmp, final, overwrite=overwrite)
    except BaseException as exc:
        remove_path(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, LostRace) and exc.filename is None and exc.errno:
            raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(final)) from exc
        raise


@contextmanager
def replaced_together(folder: str | os.PathLike[str], names: Sequence[str]) -> Iterator[Path]:
    """Yield a temporary folder to write files of ``names`` into (some may be left unwritten);
    when the block ends, the files of ``names`` in ``folder`` are replaced by the ones written,
    as one set: every old one is removed (the last of ``names`` first), then each written one
    is renamed in (the last of ``names`` last). So the last name seals the set: where it is
    there, its companions beside it were written with it, and a run cut off while replacing
    them leaves files of one set only, without the seal; an old file of ``names`` that this set
    does not write never stays to pass for one of it. On an exception nothing in ``folder``
    changes. The temporary folder (:func:`temp_sibling` of the seal) is removed either way, and
    a killed run's by the next run writing into ``folder`` or by ``wsitools clean``."""
    folder = Path(folder)
    _sweep_once(folder)
    staging = temp_sibling(folder / names[-1])
    staging.mkdir()
    try:
        yield staging
        for name in reversed(names):
            remove_path(folder / name)
        for name in names:
            if (staging / name).is_file():
                os.replace(staging / name, folder / name)
    finally:
        remove_path(staging)


class _NothingWritten(Exception):
    """Raised inside :func:`output_folder` to leave no new folder where nothing was written."""


@contextmanager
def output_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """The folder to write ``path``'s files into: ``path`` itself when it exists (its files are
    added or replaced one by one, each atomically), else a temporary renamed to ``path`` once the
    block ends, so a run cut off leaves no folder that looks finished, and one that wrote
    nothing (every item failed) leaves no folder at all."""
    path = Path(path)
    if path.is_dir():
        yield path
        return
    if path.exists() or path.is_symlink():  # a file: said now, not after the work
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path))
    try:
        with atomic_path(path) as tmp:
            tmp.mkdir()
            yield tmp
            if not any(tmp.iterdir()):
                raise _NothingWritten
    except _NothingWritten:
        pass


def file_fingerprint(path: str | os.PathLike[str], *, span: int = 1 << 20) -> str:
    """A fast identity of a large file: sha256 of its size, its first and its last ``span`` bytes.

    Reads at most 2 MiB whatever the file's size; a slide rewritten, truncated or replaced by
    another scan changes it (its header and tile index live at the start or the end).
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(str(size).encode() + b"\0")
        h.update(f.read(span))
        if size > span:
            f.seek(max(span, size - span))
            h.update(f.read(span))
    return h.hexdigest()


def read_user_text(path: Path, *, what: str, expected: str, encoding: str = "utf-8") -> str:
    """The text of a file the user named; a :class:`~wsitools.errors.DataError` naming ``what``
    and the file when it is missing, a directory (``expected`` says what was wanted) or unreadable."""
    try:
        return path.read_text(encoding=encoding)
    except FileNotFoundError:
        raise DataError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{what} {path}: is a directory, expected {expected}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{what} {path}: {_not_text(exc)}") from None
    except OSError as exc:
        raise DataError(f"{what} {path}: cannot be read ({exc})") from None


def _not_text(exc: UnicodeDecodeError) -> str:
    """What a file that is not UTF-8 text probably is, from its first bytes, for a message."""
    head = bytes(exc.object[:4])
    if head.startswith(b"PK\x03\x04"):
        return "a zip file (an Excel or OpenDocument workbook?), not text; save it as CSV (UTF-8)"
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return "UTF-16 text (a spreadsheet's 'Unicode text' export?); save it as UTF-8"
    return (f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}: Latin-1 or "
            "another legacy encoding?); save it as UTF-8")


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON through a temporary file."""
    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_safetensors(path: Path, tensors: dict[str, Any], *, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (torch tensors, copied to the CPU) to ``path`` as safetensors.

    The bytes are written by Python, so a full disk is an ``OSError`` (which :func:`atomic_path`
    names) where safetensors' own writer raises a type of its own."""
    from safetensors.torch import save

    path.write_bytes(save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata))


def write_torch(path: Path, obj: Any) -> None:
    """``torch.save`` of ``obj`` to ``path``, the bytes written by Python (a full disk is an
    ``OSError``; torch's own file writer raises ``RuntimeError``)."""
    from io import BytesIO

    import torch

    buffer = BytesIO()
    torch.save(obj, buffer)
    path.write_bytes(buffer.getbuffer())


def sha256_file(path: str | os.PathLike[str], *, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class NotRegularFile(OSError):
    """A path that names something other than a regular file (:func:`open_regular`)."""

    def __init__(self, path: str | os.PathLike[str], kind: str):
        super().__init__(f"{path}: is {kind}, not a regular file")
        self.kind = kind


def file_kind(mode: int) -> str:
    """What a file of ``st_mode`` ``mode`` (links followed) that is no regular file is, for
    messages: ``a FIFO (named pipe)``, ``a character device``, ..."""
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((kind for test, kind in kinds if test(mode)), "a special file")


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """``path`` opened for binary reading if it is (or links to) a regular file, else
    :class:`NotRegularFile` saying what it is, before a byte is read: a device such as /dev/zero
    never ends, and a FIFO never starts (opening one waits for a writer). It is judged before it
    is opened (opening some devices acts on them) and again on the open file, opened without
    waiting, so what is judged is what is read."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise NotRegularFile(path, file_kind(mode))
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise NotRegularFile(path, file_kind(mode))
    return os.fdopen(fd, "rb")


def stable_hash(obj: Any) -> str:
    """A short, stable hash of a JSON-serialisable object (sorted keys), for provenance."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def available_cpus() -> int:
    """CPUs this process may use: SLURM_CPUS_PER_TASK if set, else the affinity mask."""
    slurm = os.environ.get("SLURM_CPUS_PER_TASK")
    if slurm and slurm.isdigit() and int(slurm) > 0:
        return int(slurm)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def loader_workers() -> int:
    """The default number of DataLoader worker processes that read and decode tiles (``extract``,
    ``pretrain``, ``tune``): every CPU this process may use but one, which the main process keeps
    for the model's steps, and at most 8, which bounds the memory and start-up of the workers
    while feeding one accelerator. ``--workers`` overrides it; 0 reads in the main process."""
    return min(8, max(0, available_cpus() - 1))


@dataclass(frozen=True)
class TempReport:
    """One temporary found by :func:`scan_temps`, and whether it is stale (and why, or why not)."""

    path: Path
    bytes: int
    idle_hours: float
    """Hours since anything inside it was last written."""
    stale: bool
    why: str


def _tree_stats(path: Path) -> tuple[int, float]:
    """Total bytes and newest modification time of a file or directory tree (links not followed)."""
    st = path.lstat()
    total, newest = st.st_size, st.st_mtime
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                try:
                    s = os.lstat(os.path.join(root, name))
                except FileNotFoundError:  # removed while we look
                    continue
                total += s.st_size
                newest = max(newest, s.st_mtime)
    return total, newest


def scan_temps(
    root: str | os.PathLike[str],
    *,
    older_than_hours: float | None = None,
    judge: Callable[[Path], tuple[bool, str] | None] = lambda path: None,
) -> list[TempReport]:
    """Every wsitools temporary under ``root``, each judged stale or not.

    Stale: written on this host by a process that is gone (provably dead), or, with
    ``older_than_hours``, untouched for at least that long (the only evidence there is for a
    temporary of another host on a shared file system, or of an older wsitools). A temporary of
    a process still running on this host is never stale, however old. ``judge`` reports on a
    folder that is no temporary but state a run left behind (a partial training run): whether it
    is stale and why, or None for any other folder; a stale one is not looked into.
    """
    now = time.time()
    found = []
    for dirpath, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            path = Path(dirpath) / name
            owner = temp_owner(path)
            verdict = judge(path) if owner is None and name in dirs else None
            if owner is None and verdict is None:
                continue
            if name in dirs and (owner is not None or (verdict is not None and verdict[0])):
                dirs.remove(name)  # never look inside a temporary, or stale state, for more
            try:
                size, newest = _tree_stats(path)
            except FileNotFoundError:
                continue
            idle = max(0.0, (now - newest) / 3600.0)
            if verdict is not None:
                stale, why = verdict
            elif provably_dead(path):
                stale, why = True, f"its process {owner.pid} on this host is gone"
            elif owner.host == _host_token() and owner.pid is not None and owner.pid != os.getpid():
                stale, why = False, f"its process {owner.pid} on this host is running"  # whatever its age
            elif older_than_hours is not None and idle >= older_than_hours:
                stale, why = True, f"untouched for {idle:.1f} h"
            else:
                stale, why = False, f"from {owner.host or 'an older wsitools'}, untouched for {idle:.1f} h"
            found.append(TempReport(path, size, idle, stale, why))
    return found


@lru_cache(maxsize=1)
def yaml_loader() -> type:
    """A safe YAML loader (no Python objects) whose mapping keys are the text as written and may
    not repeat, for every YAML file a user writes (task descriptions, model cards).

    Class names are mapping keys, and plain YAML would turn ``yes``/``no``/``on``/``off`` into
    booleans, ``01`` into 1, ``1.50`` into 1.5 and ``null`` into None, so their names would no
    longer equal the labels in the table; and it keeps only the last of a repeated key, so a
    class written twice would silently vanish, as would the first of two ``input:`` sections
    of a card."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        pass

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
        loader.flatten_mapping(node)
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise yaml.constructor.ConstructorError(
                    None, None, "a key must be a plain name, not a list or mapping", key_node.start_mark)
            if key_node.value in out:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key_node.value!r} appears twice", key_node.start_mark)
            out[key_node.value] = loader.construct_object(value_node, deep=True)
        return out

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return StrictLoader


class KeptErrorFile(io.FileIO):
    """A file to write an HDF5 file through (h5py's file-object driver), which keeps the
    first ``OSError`` of a write or truncation (a full disk) and raises it from :meth:`close`,
    once HDF5 has closed the file. HDF5 cannot recover from a write that fails while it closes a
    file (the file stays half-open and the process crashes at exit), so it is never told: what
    it writes after the failure is dropped (HDF5 reads nothing back from a file it creates), and
    the file is removed."""

    error: OSError | None = None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        size = view.nbytes
        while self.error is None and view:
            try:
                view = view[os.write(self.fileno(), view) :]  # a write may take part of the bytes
            except OSError as exc:
                self.error = exc
        return size

    def truncate(self, size: int | None = None) -> int:
        if self.error is None:
            try:
                return super().truncate(size)
            except OSError as exc:
                self.error = exc
        return self.tell() if size is None else size

    def close(self) -> None:
        super().close()
        error, self.error = self.error, None
        if error is not None:
            raise error
