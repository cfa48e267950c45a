"""Orchestration only: Prefect flows, their parameters, presets and the command line."""
