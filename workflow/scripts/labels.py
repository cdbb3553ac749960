"""Rule labels: the labels table of one task (usable slides with a label only).

Which slides are usable is known only after QC, so a task can be left with too few labelled
slides here (say every slide of a class failed QC): that ends the job with one line naming the
task, in its log and on stderr, never a traceback.
"""

import sys
from pathlib import Path

from wsitools.errors import WsiToolsError
from wsitools.labels import write_labels
from wsitools.report import usable_slides
from wsitools.samples import read_samples

log = Path(snakemake.log[0])  # `snakemake` is injected by the script directive
try:
    rows = write_labels(
        read_samples(snakemake.input.sheet, check_files=False),
        usable=usable_slides(snakemake.input.summary),
        columns=snakemake.params.columns,
        out=snakemake.output.labels,
        task_type=snakemake.params.task_type,
    )
except WsiToolsError as exc:
    message = (f"task {snakemake.wildcards.task!r}: {exc} (after QC; {snakemake.input.summary} says why "
               "slides were left out)")
    log.write_text(message + "\n")
    print(message, file=sys.stderr)
    sys.exit(2)  # bad input, as the wsitools command says it
log.write_text(f"{len(rows)} usable labelled slides\n")
