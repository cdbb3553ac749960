"""wsitools train --resume: a run killed after some folds keeps them in its partial folder, a
rerun with the same settings trains only the others and writes the run folder an uninterrupted
run writes; a rerun with other settings starts afresh, saying what differs."""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from wsitools.cli import main  # noqa: E402
from wsitools.errors import ModelError  # noqa: E402
from wsitools.mil import run_folder  # noqa: E402
from wsitools.mil import train as train_module  # noqa: E402
from wsitools.mil.config import TrainConfig  # noqa: E402
from wsitools.mil.synthetic import make_bag_cohort, make_outcome_cohort  # noqa: E402
from wsitools.mil.train import train  # noqa: E402

TASK = "name: synthetic\ndescription: planted instances\nclasses:\n  neg: background\n  pos: planted\n"
SURVIVAL = "name: os\ntype: survival\ndescription: overall survival\nrisk:\n  high: many key cells\n  low: few\n"
CONFIG = TrainConfig(epochs=3, min_epochs=0, folds=3, n_boot=20, seed=2)


def _strip(value):
    """A JSON value without the fields that say when or how long (``created``, ``seconds``)."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in ("created", "seconds")}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _files(run: Path) -> dict[str, Path]:
    return {str(p.relative_to(run)): p for p in sorted(run.rglob("*")) if p.is_file()}


def assert_same_run(a: Path, b: Path) -> None:
    """Every file of run ``a`` equals ``b``'s: bytes (head weights included), but JSON and
    curves without times."""
    fa, fb = _files(a), _files(b)
    assert fa.keys() == fb.keys()
    for name, pa in fa.items():
        pb = fb[name]
        if name.endswith(".json"):
            assert _strip(json.loads(pa.read_text())) == _strip(json.loads(pb.read_text())), name
        elif name.endswith("curves.csv"):
            ra, rb = ([{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(open(p))] for p in (pa, pb))
            assert ra == rb and len(ra) > 0, name
        else:
            assert pa.read_bytes() == pb.read_bytes(), name


class Kill:
    """``train_fold`` wrapped to record the folds it trains and to stop (as a job killed there
    stops) on fold ``at``, while ``at`` is set."""

    def __init__(self, monkeypatch, at: int | None):
        self.at, self.calls, real = at, [], train_module.train_fold

        def train_fold(cohort, fold, *args, **kwargs):
            self.calls.append(fold.index)
            if fold.index == self.at:
                raise KeyboardInterrupt  # what SIGINT, or a time limit's signal, raises
            return real(cohort, fold, *args, **kwargs)

        monkeypatch.setattr(train_module, "train_fold", train_fold)


@pytest.fixture
def slides(tmp_path):
    bags = make_bag_cohort(tmp_path / "f", n_slides=18, n_tiles=(10, 20), dim=8, shift=6.0, seed=4)
    with open(tmp_path / "l.csv", "w", newline="") as f:
        csv.writer(f).writerows([["slide_id", "label", "patient_id"], *[[b.slide_id, b.label, b.patient_id] for b in bags]])
    (tmp_path / "task.yaml").write_text(TASK)
    return {"features_dir": tmp_path / "f", "labels": tmp_path / "l.csv", "task": tmp_path / "task.yaml",
            "head": "abmil", "progress": False}


def test_a_resumed_run_is_the_uninterrupted_run(slides, tmp_path, monkeypatch):
    whole = train(out_dir=tmp_path / "whole", config=CONFIG, **slides)
    kill = Kill(monkeypatch, at=1)
    with pytest.raises(KeyboardInterrupt):
        train(out_dir=tmp_path / "o", config=CONFIG, resume=True, **slides)
    partial = tmp_path / ".o.partial"
    assert not (tmp_path / "o").exists() and kill.calls == [0, 1]
    assert json.loads((partial / "partial.json").read_text())["folds_done"] == [0]
    assert (partial / "fold_0" / "model.safetensors").is_file() and not (partial / "fold_1").exists()
    with pytest.raises(ModelError, match="unfinished training run"):  # never taken for a finished run
        run_folder.check_run(partial)
    kill.at, kill.calls = None, []
    resumed = train(out_dir=tmp_path / "o", config=CONFIG, resume=True, **slides)
    assert kill.calls == [1, 2]  # fold 0 read back, not trained again
    assert not partial.exists() and not (tmp_path / "o" / "partial.json").exists()
    assert _strip(resumed) == _strip(whole) and len(resumed["folds"]) == 3
    assert_same_run(tmp_path / "o", tmp_path / "whole")
    assert run_folder.check_run(tmp_path / "o")["n_folds"] == 3


def test_a_resume_writes_again_the_results_a_killed_run_left_damaged(slides, tmp_path, monkeypatch):
    # A fold read back is recomputed from its head: its predictions table, plot and its test
    # slides' attention files are written again from that, not carried over missing or cut off.
    train(out_dir=tmp_path / "whole", config=CONFIG, **slides)
    kill = Kill(monkeypatch, at=2)
    with pytest.raises(KeyboardInterrupt):
        train(out_dir=tmp_path / "o", config=CONFIG, resume=True, **slides)
    partial = tmp_path / ".o.partial"
    assert json.loads((partial / "partial.json").read_text())["folds_done"] == [0, 1]
    (partial / "fold_0" / "predictions.csv").unlink()
    (partial / "fold_0" / "curves.png").unlink()
    table = partial / "fold_1" / "predictions.csv"
    table.write_bytes(table.read_bytes()[:40])
    fold_0 = [r["slide_id"] for r in csv.DictReader(open(tmp_path / "whole" / "fold_0" / "predictions.csv"))]
    for sid in fold_0:
        (partial / "attention" / f"{sid}.h5").unlink()
    kill.at, kill.calls = None, []
    train(out_dir=tmp_path / "o", config=CONFIG, resume=True, **slides)
    assert kill.calls == [2] and len(fold_0) == 6 and not partial.exists()
    assert_same_run(tmp_path / "o", tmp_path / "whole")


def test_partial_folders_are_removed_once_replaced_and_listed_by_clean_as_what_they_are(
    slides, tmp_path, monkeypatch, capsys
):
    """A run finished without --resume replaces the run a killed --resume left in its partial
    folder, and removes that folder; ``wsitools clean`` keeps a partial folder a train may be
    writing or can resume, and removes one no run can use (no record, or older than the run
    finished beside it)."""
    import shutil
    import socket
    import subprocess
    import sys

    from cli_calls import run_cli

    config = replace(CONFIG, epochs=2, folds=2)
    kill = Kill(monkeypatch, at=1)
    with pytest.raises(KeyboardInterrupt):
        train(out_dir=tmp_path / "o", config=config, resume=True, **slides)
    shutil.copytree(tmp_path / ".o.partial", tmp_path / "kept")
    kill.at = None
    train(out_dir=tmp_path / "o", config=config, **slides)
    assert (tmp_path / "o" / "run.json").is_file() and not (tmp_path / ".o.partial").exists()

    shutil.copytree(tmp_path / "o", tmp_path / "e")
    for name in ("o", "e", "d", "p"):
        shutil.copytree(tmp_path / "kept", tmp_path / f".{name}.partial")
    os.utime(tmp_path / ".o.partial" / "partial.json", (0, 0))  # older than o/run.json: left by the run o replaced
    os.utime(tmp_path / ".e.partial" / "partial.json")  # newer than e/run.json: a rerun of e, killed
    (tmp_path / ".c.partial" / "attention").mkdir(parents=True)  # cut off before its record
    (tmp_path / ".d.lock").write_text(f"{os.getpid()} on {socket.gethostname()}\n")  # a train writing d
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".p.lock").write_text(f"{dead.pid} on {socket.gethostname()}\n")  # left by a killed train
    shutil.rmtree(tmp_path / "kept")

    rc, out, err = run_cli(["clean", tmp_path, "--dry-run"], capsys)
    lines = {Path(line.split("\t")[1]).name: (line.split("\t")[0], line.split("\t")[3])
             for line in out.splitlines()[:-1]}
    resumable = "resumable: a train --resume of {} with the same settings reads its finished folds back (0); " \
                "remove it by hand to discard them"
    assert rc == 0 and err == "" and lines == {
        ".c.partial": ("would remove", "obsolete: it has no partial.json (cut off before its first fold)"),
        ".d.partial": ("kept", f"a train of {tmp_path / 'd'} may be writing it (its lock is held by process "
                               f"{os.getpid()} on {socket.gethostname()})"),
        ".e.partial": ("kept", resumable.format(tmp_path / "e")),
        ".o.partial": ("would remove", f"obsolete: {tmp_path / 'o'} was trained again and finished after it"),
        ".p.partial": ("kept", resumable.format(tmp_path / "p")),
    }
    assert out.splitlines()[-1].startswith("2 stale temporaries or obsolete partial runs, would free ")
    assert run_cli(["clean", tmp_path], capsys)[0] == 0
    assert sorted(p.name for p in tmp_path.glob(".*.partial")) == [".d.partial", ".e.partial", ".p.partial"]


def test_resume_with_other_settings_starts_afresh_naming_what_changed(slides, tmp_path, monkeypatch, capsys, caplog):
    # The workflow reruns train with --resume when its inputs change: folds of other settings
    # (another cohort, other labels or options) cannot be reused, and nothing of them may stay.
    kill = Kill(monkeypatch, at=2)
    with pytest.raises(KeyboardInterrupt):
        train(out_dir=tmp_path / "o", config=CONFIG, resume=True, **slides)
    partial = tmp_path / ".o.partial"
    assert json.loads((partial / "partial.json").read_text())["folds_done"] == [0, 1]
    (partial / "fold_7").mkdir()  # what a run of other settings may leave
    kill.at, kill.calls = None, []
    with caplog.at_level(logging.WARNING):
        resumed = train(out_dir=tmp_path / "o", config=replace(CONFIG, lr=2e-3), resume=True, **slides)
    assert (f"{partial}: written by a run with other settings (train.lr: 0.001 -> 0.002); starting afresh"
            in caplog.text)
    assert kill.calls == [0, 1, 2] and not partial.exists() and not (tmp_path / "o" / "fold_7").exists()
    fresh = train(out_dir=tmp_path / "fresh", config=replace(CONFIG, lr=2e-3), **slides)
    assert _strip(resumed) == _strip(fresh)
    kill.at, kill.calls = 2, []
    with pytest.raises(KeyboardInterrupt):
        train(out_dir=tmp_path / "p", config=CONFIG, resume=True, **slides)
    args = ["train", "--features", str(slides["features_dir"]), "--labels", str(slides["labels"]), "--task",
            str(slides["task"]), "--epochs", "3", "--min-epochs", "0", "--folds", "3", "--bootstrap", "20",
            "--seed", "2", "--quiet", "--resume", "--out", str(tmp_path / "p")]
    kill.at, kill.calls = None, []
    assert main([*args, "--workers", "1"]) == 0  # loader workers change no result: resumed
    assert kill.calls == [2] and not (tmp_path / ".p.partial").exists() and (tmp_path / "p" / "run.json").is_file()


def test_a_damaged_head_of_a_finished_fold_is_trained_again_by_resume(slides, tmp_path, monkeypatch, caplog):
    whole = train(out_dir=tmp_path / "whole", config=CONFIG, **slides)
    kill = Kill(monkeypatch, at=2)
    with pytest.raises(KeyboardInterrupt):
        train(out_dir=tmp_path / "o", config=CONFIG, resume=True, **slides)
    partial = tmp_path / ".o.partial"
    fold = partial / "fold_0"
    data = bytearray((fold / "model.safetensors").read_bytes())
    data[-1] ^= 1  # an exponent bit of a weight: the head reads, and predicts otherwise
    (fold / "model.safetensors").write_bytes(bytes(data))
    (partial / "fold_1" / "metrics.json").write_text("{")  # cut off
    kill.at, kill.calls = 1, []
    with pytest.raises(KeyboardInterrupt):  # killed again while fold 1 trains again
        train(out_dir=tmp_path / "o", config=CONFIG, resume=True, **slides)
    assert kill.calls == [0, 1]  # fold 0 was not reused: trained again, and is now done
    assert json.loads((partial / "partial.json").read_text())["folds_done"] == [0]
    assert f"fold 0: cannot be read back ({fold / 'model.safetensors'}: checksum mismatch" in caplog.text
    kill.at, kill.calls = None, []
    resumed = train(out_dir=tmp_path / "o", config=CONFIG, resume=True, **slides)
    assert kill.calls == [1, 2] and not partial.exists()
    assert _strip(resumed) == _strip(whole)
    assert_same_run(tmp_path / "o", tmp_path / "whole")


def test_a_partial_folder_without_its_record_is_started_afresh(slides, tmp_path):
    partial = tmp_path / ".o.partial"
    (partial / "fold_0").mkdir(parents=True)
    (partial / "fold_0" / "model.safetensors").write_bytes(b"cut off")
    train(out_dir=tmp_path / "o", config=replace(CONFIG, folds=2), resume=True, **slides)
    assert not partial.exists() and load_file(tmp_path / "o" / "fold_0" / "model.safetensors")


def test_resume_of_a_survival_run_on_patient_bags(tmp_path, monkeypatch):
    labels = tmp_path / "labels.csv"
    make_outcome_cohort(tmp_path / "f", n_slides=24, n_tiles=(20, 30), dim=8, slides_per_patient=2, seed=3,
                        task_type="survival", labels_path=labels)
    (tmp_path / "task.yaml").write_text(SURVIVAL)
    options = {"features_dir": tmp_path / "f", "labels": labels, "task": tmp_path / "task.yaml", "bag": "patient",
               "config": TrainConfig(epochs=2, min_epochs=0, folds=2, n_boot=20, survival_batch=4), "progress": False}
    train(out_dir=tmp_path / "whole", **options)
    kill = Kill(monkeypatch, at=1)
    with pytest.raises(KeyboardInterrupt):
        train(out_dir=tmp_path / "o", resume=True, **options)
    kill.at, kill.calls = None, []
    summary = train(out_dir=tmp_path / "o", resume=True, **options)
    assert kill.calls == [1] and summary["n_patients"] == 12 and "c_index" in summary["pooled"]
    assert_same_run(tmp_path / "o", tmp_path / "whole")


def test_a_second_train_of_one_out_is_refused_while_the_first_holds_it(slides, tmp_path, monkeypatch, capsys):
    """Two trains (with --resume, or one of each) of one --out would write one partial folder, or
    one would train for hours to lose the race to rename its run into place: the second one is
    refused at once, naming the folder, and writes nothing; the lock goes with its holder."""
    import signal
    import subprocess
    import sys

    from cli_calls import one_line, run

    out, lock = tmp_path / "o", (tmp_path / ".o.lock").resolve()
    (tmp_path / "link").symlink_to(tmp_path)
    assert run_folder.lock_path(out) == run_folder.lock_path(tmp_path / "link" / "o") == lock  # one run, one lock
    (tmp_path / "link").unlink()
    args = ["train", "--features", slides["features_dir"], "--labels", slides["labels"], "--task", slides["task"],
            "--epochs", "2", "--min-epochs", "0", "--folds", "2", "--bootstrap", "0", "--quiet", "--out", out]
    kill = Kill(monkeypatch, at=None)
    with run_folder.locked(out):
        assert lock.read_text() == f"{os.getpid()} on {__import__('socket').gethostname()}\n"
        for extra in (["--resume"], []):
            rc, err = run([*args, *extra], capsys)
            one_line(rc, err, f"wsitools train: error: {out}: another wsitools train is writing this run (its lock "
                              f"{lock} is held by process {os.getpid()} on ", "wait for it to end, or give another --out")
        assert kill.calls == [] and sorted(p.name for p in tmp_path.iterdir()) == [".o.lock", "f", "l.csv", "task.yaml"]
    assert not lock.exists()  # let go with the block

    holder = subprocess.Popen(  # another process holds the lock, then is killed
        [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()", lock],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    rc, err = run([*args, "--resume"], capsys)
    one_line(rc, err, f"{out}: another wsitools train is writing this run (its lock {lock} is held)")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert run([*args, "--resume"], capsys) == (0, "")  # the dead process's lock is gone with it
    assert kill.calls == [0, 1] and (out / "run.json").is_file() and not lock.exists()
    assert run([*args, "--overwrite"], capsys) == (0, "") and not lock.exists()
