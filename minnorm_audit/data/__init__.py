"""Load a labeled dataset into tensors, read-only, setting aside what cannot be read.

Three layouts are understood on disk (see :func:`load_dataset`): an image folder,
``DATA/<class_name>/<image files>``; a manifest, a CSV or Parquet file with a path
column and a label column; a table, a CSV or Parquet file with numeric feature columns
and a label column. Data already in memory (a DataFrame, arrays, a torch Dataset) is
validated the same way. One unusable example (an unreadable file, an empty label, a
missing value) is *set aside* with a reason; a problem with the input as a whole raises
:class:`DataError`; what the loader decided about the input is kept as notes
(:class:`DataNotice`). Nothing under the data path is
ever created, changed or deleted.

Modules, in the order data flows through them:

- ``load``: :func:`load_dataset`, which picks the layout of a path on disk;
- ``folder``: the image folder layout;
- ``manifest``: the manifest layout, and the containment of its paths;
- ``table``: reading CSV and Parquet files, and tables of features;
- ``encode``: mixed-type columns (booleans, categories, dates, ids) as numeric features;
- ``text``: a free-text column as hashed n-gram ids for the text network;
- ``image_table``: a Parquet column of encoded images (Hugging Face ``Image``);
- ``memory``: :func:`load_frame`, :func:`load_arrays`, :func:`load_torch_dataset`;
- ``labels``: label text, class indices and numeric values from cells;
- ``image_files``: many image files decoded (or pre-scanned) into one dataset;
- ``images``: one image file to uint8 RGB pixels, or the reason it is set aside;
- ``placement``: the memory budget, :class:`LazyImages` (streamed images) and the
  batch sources that bring batches to the training device;
- ``fingerprint``: the dataset fingerprint;
- ``dataset``: :class:`LoadedDataset`, :class:`SetAsideItem`, :class:`DataError`;
- ``demo``: the bundled digits and :func:`write_demo_dataset`.
"""

from __future__ import annotations

from .dataset import FORMATS, MOSTLY_BAD_SHARE, TASKS, DataError, DataNotice, LoadedDataset, SetAsideItem
from .demo import DemoDataset, load_bundled_digits, write_demo_dataset
from .images import IMAGE_FORMATS
from .load import load_dataset
from .memory import load_arrays, load_frame, load_torch_dataset
from .placement import BatchSource, LazyImages, make_batch_source
from .table import TABLE_SUFFIXES

__all__ = [
    "FORMATS",
    "IMAGE_FORMATS",
    "MOSTLY_BAD_SHARE",
    "TABLE_SUFFIXES",
    "TASKS",
    "BatchSource",
    "DataError",
    "DataNotice",
    "DemoDataset",
    "LazyImages",
    "LoadedDataset",
    "SetAsideItem",
    "load_arrays",
    "load_bundled_digits",
    "load_dataset",
    "load_frame",
    "load_torch_dataset",
    "make_batch_source",
    "write_demo_dataset",
]
