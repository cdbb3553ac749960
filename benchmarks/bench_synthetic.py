"""Writing a synthetic slide: the whole pyramid against level 0 alone (the bound).

Each write runs in its own process, so its peak resident memory is its own. Level 0 alone is the
least any writer of this slide must do (render every level-0 pixel, JPEG-encode it, write it);
the pyramid adds the smaller levels and the SVS thumbnail. The ratio says what they cost.

    python benchmarks/bench_synthetic.py [--size 40000x30000] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, resource, sys, time
from pathlib import Path
from wsitools.synthetic import Region, write_slide
w, h, fmt, levels, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], Path(sys.argv[5])
regions = [Region(int(w * .05), int(h * .1), int(w * .4), int(h * .8)),
           Region(int(w * .5), int(h * .05), int(w * .45), int(h * .5)),
           Region(int(w * .55), int(h * .6), int(w * .3), int(h * .35), "other")]
t = time.perf_counter()
write_slide(out, size=(w, h), mpp=0.25, regions=regions, fmt=fmt, downsamples=tuple(map(int, levels.split(","))))
print(json.dumps({"seconds": time.perf_counter() - t,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "mb": out.stat().st_size / 1e6}))
"""


def write(width: int, height: int, fmt: str, levels: str, out: Path) -> dict[str, float]:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(width), str(height), fmt, levels, str(out)],
        check=True, capture_output=True, text=True,
    )
    out.unlink()
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="12000x9000", help="level-0 WIDTHxHEIGHT (default 12000x9000)")
    ap.add_argument("--out", default=None, help="folder for the slides (default: a temporary folder)")
    args = ap.parse_args()
    width, height = map(int, args.size.lower().split("x"))
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        pyramid = write(width, height, "svs", "1,2,4,8,16", Path(tmp) / "pyramid.svs")
        level0 = write(width, height, "tiff", "1", Path(tmp) / "level0.tiff")
    for name, r in (("pyramid 1/2/4/8/16 + thumbnail", pyramid), ("level 0 alone (bound)", level0)):
        print(f"{name:32s} {r['seconds']:7.1f} s  peak {r['peak_mib']:6.0f} MiB  {r['mb']:7.0f} MB")
    print(f"pyramid / level 0: {pyramid['seconds'] / level0['seconds']:.2f}x time")


if __name__ == "__main__":
    main()
