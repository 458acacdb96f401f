"""Drift: whether a new batch of data differs from the representative set (pixel statistics, embeddings,
caption words and sentence embeddings), and the false-alarm calibration.

May import: config, core, data, models, evaluation.
"""
