"""Distillation methods, one file each, each reading like its paper."""
