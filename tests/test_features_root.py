"""The features root for an encoder's folder: `wsitools extract --out features` writes
``features/{encoder}/{slide_id}.h5``, and `train`, `predict` and `export` take the encoder's
folder. Given the root instead (the usual slip of a first run), each says which folder to give.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wsitools.feature_store import features_root_hint
from wsitools.mil.synthetic import make_bag_cohort
from cli_calls import run


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    """A features root with two encoder folders (one of them holding a small labelled cohort)."""
    make_bag_cohort(tmp_path / "features" / "enc-a", n_slides=8, n_tiles=(6, 10), dim=8,
                    labels_path=tmp_path / "labels.csv")
    (tmp_path / "features" / "enc-b").mkdir()
    np.save(tmp_path / "features" / "enc-b" / "not-a-store.npy", np.zeros(3))  # no .h5: not named
    (tmp_path / "features" / "enc-c").mkdir()
    (tmp_path / "features" / "enc-c" / "s0.h5").write_bytes(b"")  # any .h5 makes an encoder folder
    return tmp_path


def test_the_hint_names_the_encoder_folders_of_a_features_root(root):
    features = root / "features"
    assert features_root_hint(features) == (
        f"; it is a features root holding the encoder folders enc-a, enc-c: give one of them, e.g. {features / 'enc-a'}"
    )
    assert features_root_hint(features / "enc-b") == ""  # no sub-folders with stores
    assert features_root_hint(root / "nowhere") == ""


def test_train_predict_and_export_given_the_features_root_say_which_folder_to_give(root, capsys):
    features, hint = root / "features", f"give one of them, e.g. {root / 'features' / 'enc-a'}"
    rc, err = run(["train", "--features", features, "--labels", root / "labels.csv", "--head", "meanpool",
                   "--folds", "2", "--epochs", "2", "--device", "cpu", "--quiet", "--out", root / "heads"], capsys)
    line = err.strip().splitlines()[-1]
    assert rc == 2
    assert line.startswith(f"wsitools train: error: no labelled slide has a usable feature store in {features}: "
                           "it holds no feature stores ({slide_id}.h5); it is a features root")
    assert line.endswith(hint)
    assert not (root / "heads").exists()

    rc, err = run(["train", "--features", features / "enc-a", "--labels", root / "labels.csv", "--head", "meanpool",
                   "--folds", "2", "--epochs", "2", "--device", "cpu", "--quiet", "--out", root / "heads"], capsys)
    assert rc == 0, err
    rc, err = run(["predict", "--model", root / "heads", "--features", features, "--out", root / "pred",
                   "--device", "cpu", "--quiet"], capsys)
    assert (rc, err.strip()) == (2, f"wsitools predict: error: no feature stores ({{slide_id}}.h5) in {features}; "
                                    f"it is a features root holding the encoder folders enc-a, enc-c: {hint}")
    rc, err = run(["export", "--to", "clam", "--features", features, "--out", root / "clam"], capsys)
    assert (rc, err.strip()) == (2, f"wsitools export: error: feature directory {features}: holds no feature stores "
                                    f"(*.h5); it is a features root holding the encoder folders enc-a, enc-c: {hint}")


def test_train_given_clams_pt_files_is_told_to_give_h5_files(root, capsys):
    clam = root / "clam"
    rc, err = run(["export", "--to", "clam", "--features", root / "features" / "enc-a", "--out", clam, "--quiet"],
                  capsys)
    assert rc == 0, err
    hint = (f"; it holds .pt files (CLAM's pt_files: features without tile coordinates): give the folder of the same "
            f"features as h5 files with their coords, CLAM's h5_files, e.g. {clam / 'h5_files'}")
    assert features_root_hint(clam / "pt_files") == hint
    rc, err = run(["train", "--features", clam / "pt_files", "--labels", root / "labels.csv", "--head", "meanpool",
                   "--folds", "2", "--epochs", "2", "--device", "cpu", "--quiet", "--out", root / "heads"], capsys)
    assert rc == 2 and err.strip().splitlines()[-1] == (
        f"wsitools train: error: no labelled slide has a usable feature store in {clam / 'pt_files'}: it holds no "
        f"feature stores ({{slide_id}}.h5){hint}")
