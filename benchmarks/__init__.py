"""Benchmarks (not tests): timings and memory, printed as tables and written as JSON."""
