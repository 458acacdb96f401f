"""Prefect flows: wiring only. Installed as `redistill.flows`.

Importing the flows ties Prefect's ephemeral API server to this process (tasks/processes.py), so a killed
flow run never leaves a server behind."""

from redistill.tasks.processes import tie_ephemeral_server_to_this_process

tie_ephemeral_server_to_this_process()
