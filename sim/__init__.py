"""Deterministic simulation of the engine: the fuzzer's programs on the memory adapters.

See docs/simulation.md.
"""
