"""The watch: its state file, the cheap scan of what changed, and the pure planner that turns findings into
actions (which the Prefect flow executes).

May import: config, core, data, models; the planner imports nothing with side effects.
"""
