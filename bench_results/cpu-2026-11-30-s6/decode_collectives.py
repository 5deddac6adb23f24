"""Collectives in the compiled decode step by mesh (BENCHMARKS.md, session 6).

    python bench_results/cpu-2026-11-30-s6/decode_collectives.py 1x2 1x4 1x8 2x4

A Grok-shaped tiny model (16 query / 8 KV heads) on 8 CPU devices; counts at 2 and 3 layers,
so the difference is one layer's. Uses tests/test_runners.py's helper.
"""
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [root, os.path.join(root, "tests")]

from test_runners import _decode_collectives  # noqa: E402

for arg in sys.argv[1:] or ["1x2", "1x8", "2x4"]:
    shape = tuple(int(n) for n in arg.split("x"))
    two, three = _decode_collectives(2, shape), _decode_collectives(3, shape)
    print(f"{arg}: per layer {dict(three - two)}; outside the layers {dict(two - (three - two) - (three - two))}")
