"""Stress and benchmark tools for Odin: fan-out throughput, latency and memory per connection.

Run ``python -m stress.bench_fanout --help`` from the repository root.
"""
