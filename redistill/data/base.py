"""What every data module shares: the image files a folder holds, and the error a data set that cannot be used raises."""

from __future__ import annotations

IMAGE_SUFFIXES = {".png"}


class DataError(ValueError):
    """Image data that cannot be used; the message says what is wrong and what to do."""
