"""The fan-out benchmark (``python -m odin_fanout.stress.bench_fanout``, ``odin-stress bench
fanout``), one module a job: ``runs`` starts the processes of one run and measures it, ``results``
merges and judges what the clients report and gives the ratios to the peers, ``report`` prints the
tables (rich) and writes the JSON. Process control is in ``odin_fanout.stress.children``, /proc
sampling in ``odin_fanout.stress.procstat``, the machine's description in
``odin_fanout.stress.machine``."""

from __future__ import annotations
