"""Judging a student: feature spaces (the classifier, the label-free encoder, local Inception/CLIP/DINOv2),
FID/KID with their floors and intervals, teacher and student sampling with the sample store, speed and memory,
and the gate.

May import: config, core, data, models.
"""
