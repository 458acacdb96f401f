"""The MLflow side: the registry client and its retries, lineage (ours and MLflow's records), model cards,
the pyfunc serving flavour and export.

May import: config, core, data, models, evaluation; MLflow inside functions.
"""
