"""Benchmarks: `promptdelta bench kernel | backbone | data | deltas`."""
