"""The data: image folders and their hashes, the embedded digits, captions, the synthetic shapes, growing the
representative set, and its validation (the profile and the great_expectations suite).

May import: config, core.
"""
