"""Every HDF5 file the package writes (feature stores, attention files, CLAM/TRIDENT exports)
fails on a full disk with one ``OSError`` naming the file, leaves nothing, and does not crash
the process at exit (HDF5 cannot recover from a write that fails while it closes a file)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

SCRIPT = """
import json, resource, signal, sys
from pathlib import Path
import numpy as np
kind, path, limit = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
features, coords = np.ones((2000, 64), np.float32), np.zeros((2000, 2), np.int64)
if limit:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
try:
    if kind == "feature store":
        from wsitools.feature_store import write_feature_store
        write_feature_store(path, features, coords, {"encoder": "e", "slide_id": "S1", "tile_size": 224,
                                                     "tile_size_level0": 448.0, "mpp_target": 0.5})
    elif kind == "attention":
        from wsitools.attention import write_attention
        write_attention(path, slide_id="S1", attention=np.full(2000, 1 / 2000), coords=coords, classes=["a", "b"],
                        probs=np.array([0.5, 0.5]), feature_path="S1.h5", provenance={}, meta={"head": "abmil"})
    else:
        from wsitools.export import _write_h5
        _write_h5(path, coords, {"patch_size": 224}, file_attrs={"slide_id": "S1"}, features=features)
    print(json.dumps(path.stat().st_size))
except OSError as exc:
    print(json.dumps([exc.errno, exc.filename]))
"""


def _write(kind: str, path, limit: int) -> object:
    result = subprocess.run([sys.executable, "-c", SCRIPT, kind, str(path), str(limit)], capture_output=True,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert (result.returncode, result.stderr) == (0, ""), result.stderr[-2000:]
    return json.loads(result.stdout)


@pytest.mark.parametrize("kind", ["feature store", "attention", "export"])
def test_an_h5_file_written_on_a_full_disk_is_one_oserror_naming_it(kind, tmp_path):
    size = _write(kind, tmp_path / "whole" / "S1.h5", 0)
    for limit in (size - 1, size // 2, 1000):  # the last metadata write as HDF5 closes, the data, the start
        path = tmp_path / "out" / "S1.h5"
        assert _write(kind, path, limit) == [errno.EFBIG, str(path)], limit
        assert list(path.parent.iterdir()) == []
