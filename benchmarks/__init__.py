"""seqserve benchmarks: `python -m benchmarks.run` (see run.py). Measurements, not tests."""
