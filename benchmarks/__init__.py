"""Benchmarks for agentq; see benchmarks/README.md. Not part of the installed package."""
