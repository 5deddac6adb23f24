"""Test setup: 8 forced host devices so mesh tests run on any laptop CPU."""

import os

# Must happen before jax is imported anywhere in the test session.
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# run.py and bench.py turn on a persistent compilation cache in ~/.cache by default; tests
# that want one pass their own directory.
os.environ.setdefault("GROK1_COMPILATION_CACHE", "off")

import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
