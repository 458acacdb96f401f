"""Small shared mechanisms with no knowledge of diffusion: resumable checkpoints, failpoints for the fault
trials, file checks and atomic folder writes, child processes that die with their parent.

May import: the standard library and torch only.
"""
