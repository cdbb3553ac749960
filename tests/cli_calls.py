"""Calling the ``wsitools`` command in the test process, and checking its one-line errors."""

from __future__ import annotations

from wsitools.cli import main


def run_cli(argv: list, capsys) -> tuple[int, str, str]:
    """``wsitools ARGV`` in this process: (exit status, stdout, stderr)."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse ends the process on a bad option
        rc = exc.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def run(argv: list, capsys) -> tuple[int, str]:
    """``wsitools ARGV`` in this process: (exit status, stderr)."""
    rc, _, err = run_cli(argv, capsys)
    return rc, err


def one_line(rc: int, err: str, *needles: str) -> str:
    """The one error line of a refused command (exit 2, no traceback; log lines aside), which
    holds every one of ``needles``."""
    lines = [line for line in err.strip().splitlines() if not line.startswith(("INFO", "WARNING"))]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
