"""Benchmarks of remotefs_aa: run as scripts, never collected by pytest."""
