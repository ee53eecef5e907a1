"""Odin's stress tool and benchmarks: load runs that check every client's streams
(``python -m stress run``), and fan-out, ingest and publisher benchmarks against peers
(``python -m stress bench ...``)."""
