"""Dataset readers: every on-disk format deepres reads, returned as uint8 image tensors."""

from deepres.data.readers import (
    DataError,
    ImageDataset,
    available_splits,
    image_files,
    open_dataset,
)

__all__ = ["DataError", "ImageDataset", "available_splits", "image_files", "open_dataset"]
