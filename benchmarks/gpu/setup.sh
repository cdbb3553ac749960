#!/usr/bin/env bash
# Installs the project on a GPU machine that has Python with torch, timm, torchvision, h5py,
# scikit-image and tifffile but no network. The other dependencies come as wheels made here with
#   bash benchmarks/gpu/fetch-wheels.sh            (-> .gpu-wheels/, about 50 MB)
# and carried to that machine with the working tree. Source it from the project root:
#   source benchmarks/gpu/setup.sh
set -e
python3 -m pip install -q --no-index --no-deps --no-compile .gpu-wheels/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .
set +e
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 - <<'PY'
import torch, timm, zarr, wsitools
print(f"torch {torch.__version__}, timm {timm.__version__}, zarr {zarr.__version__}, "
      f"GPU {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}, "
      f"{torch.get_num_threads()} threads, wsitools at {wsitools.__file__}")
PY
