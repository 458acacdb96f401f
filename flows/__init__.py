"""Prefect flows: wiring only. Installed as `redistill.flows`."""
