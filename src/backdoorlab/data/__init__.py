"""Datasets, readers, caching and splits."""

from .datasets import DATASETS, DataBundle, DatasetConfig, DatasetInfo, load_dataset, locate
from .splits import defender_split
from .tensordata import TensorData, from_uint8_nhwc, to_uint8_nhwc

__all__ = [
    "DATASETS", "DataBundle", "DatasetConfig", "DatasetInfo", "TensorData", "defender_split",
    "from_uint8_nhwc", "load_dataset", "locate", "to_uint8_nhwc",
]
