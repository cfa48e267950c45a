"""One stage, one module: its config, its plain functions, one thin Prefect task."""
