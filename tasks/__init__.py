"""Units of work as Prefect tasks. Installed as `redistill.tasks`."""
