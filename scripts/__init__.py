"""Helper scripts, importable as `scripts.*` (run as `python -m scripts.run_demo`)."""
