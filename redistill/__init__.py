"""redistill: continuous re-distillation of pre-trained diffusion models.

The library, layered by concern; imports point down this list only:
config → core → data → models → evaluation → teachers → methods → drift → registry → cycle → watch → ops → cli.
It needs torch and diffusers (MLflow only in registry/ and above, and lazily); Prefect lives in `redistill.tasks`
and `redistill.flows` (the repository's tasks/ and flows/), which import the library and never the other way.
"""
