"""Operations around the cycle: `redistill stack` (PostgreSQL, MLflow and Prefect servers, workers, a DVC
remote), multi-process distillation through `accelerate launch`, and the bench.

May import: everything below it in the library.
"""
