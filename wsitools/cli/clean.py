"""``wsitools clean``: find and remove the temporaries of runs that died.

Every output is written under a temporary name, ``.tmp-NAME-HOST-PID-RANDOM``, beside its final
path and renamed when complete. A run that is killed leaves its temporary behind. Tiling and
extraction remove the dead temporaries of their own host before writing; this command does it
for whole folders, and, with ``--older-than``, also for the temporaries of other hosts on a
shared file system, whose processes cannot be checked from here. A name of the form older
wsitools gave its temporaries, .tmp-NAME-PID, which other tools and people use too, counts only
where it can be nothing else: NAME ends in .zarr or .h5, or the run folder NAME is beside it.

The partial folder of a resumable training run (``.NAME.partial/``, ``wsitools train --resume``)
is state, not a temporary: it is listed, and kept while a ``train`` may be writing it or while
``train --resume`` can continue it; one that no run can use any more (without its record, or
older than the run finished beside it) is obsolete and removed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from wsitools.errors import DataError
from wsitools.io import remove_path, scan_temps


def _partial_run(path: Path) -> tuple[bool, str] | None:
    """Whether ``path``, when it is the partial folder of a training run, is obsolete, and why
    (:func:`~wsitools.mil.run_folder.partial_state`); None for any other folder."""
    if not path.name.endswith(".partial"):
        return None
    from wsitools.mil.run_folder import partial_state  # imports torch: only once such a folder is found

    return partial_state(path)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("clean", help="list and remove temporaries left by dead runs, and obsolete partial "
                       "training runs", description=__doc__)
    p.add_argument("dirs", nargs="+", metavar="DIR", help="folders to search (recursively)")
    p.add_argument("--older-than", type=float, default=None, metavar="HOURS",
                   help="also remove temporaries untouched for this many hours, whatever host wrote them "
                   "(default: only those of this host whose process is gone)")
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    p.set_defaults(func=run)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def run(args: argparse.Namespace) -> int:
    if args.older_than is not None and not args.older_than >= 0:
        raise DataError(f"--older-than must be a number of hours >= 0, got {args.older_than}")
    for d in map(Path, args.dirs):
        if not d.is_dir():
            raise DataError(f"{d}: no such folder")
    removed, freed = 0, 0
    for d in args.dirs:
        for temp in scan_temps(d, older_than_hours=args.older_than, judge=_partial_run):
            if temp.stale:
                action = "would remove" if args.dry_run else "removed"
                if not args.dry_run:
                    remove_path(temp.path)
                removed += 1
                freed += temp.bytes
            else:
                action = "kept"
            print(f"{action}\t{temp.path}\t{_size(temp.bytes)}\t{temp.why}")
    verb = "would free" if args.dry_run else "freed"
    print(f"{removed} stale temporaries or obsolete partial runs, {verb} {_size(freed)}")
    return 0
