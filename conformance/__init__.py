"""Conformance suite: a backend's numerics and throughput against the CPU reference."""
