"""Where the training data lives, and how batches of it reach the model.

Three placements, chosen by an explicit memory budget (``--max-memory-gb``):

``"device"``
    The whole dataset is one tensor on the training device, indexed with the batch's
    example ids (airbench style; no DataLoader). Used when the decoded data fits the
    budget on the device (always on the CPU).
``"host"``
    The dataset is a tensor in host memory that does not fit the device budget: each
    batch is gathered on the host, pinned and copied asynchronously.
``"stream"``
    Images whose decoded size does not fit the host budget are never decoded all at
    once: :class:`LazyImages` decodes one file per item in DataLoader workers
    (``--workers``), with the same decoding as the eager loader, so the pixels and
    hence the scores are the same. Unreadable files are found by a cheap pre-scan
    (:func:`.images.prescan_image_file`) and set aside before training, as the eager
    loader does.

Every placement yields ``(example_ids, inputs)`` on the device for a given list of
id batches, so the multipliers are always indexed by the ids the batch really holds.

The budget: ``max_memory_gb`` when given, else half of the memory available now
(host: ``MemAvailable``; CUDA: free device memory), shared between the processes of
a torchrun launch on the same machine.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .images import _decode_image_bytes

AUTO_MEMORY_FRACTION = 0.5


# --------------------------------------------------------------------------- budget


def available_host_memory() -> int:
    """Bytes of host memory available now (``MemAvailable`` on Linux, else free pages)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30  # unknown platform: assume a modest machine


def memory_budget_bytes(max_memory_gb: float | None, device: torch.device | None = None) -> int:
    """The bytes of decoded data this process may hold on ``device`` (host when None).

    ``max_memory_gb`` wins when given; otherwise half of what is available, divided
    among the torchrun processes on this machine (``LOCAL_WORLD_SIZE``).
    """
    if max_memory_gb is not None:
        return int(max_memory_gb * 2**30)
    if device is not None and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(AUTO_MEMORY_FRACTION * free)
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return int(AUTO_MEMORY_FRACTION * available_host_memory() / processes)


def decoded_image_bytes(count: int, image_size: int) -> int:
    """Bytes of ``count`` decoded uint8 RGB images of side ``image_size``."""
    return count * 3 * image_size * image_size


def images_fit_in_memory(count: int, image_size: int, max_memory_gb: float | None) -> bool:
    """Whether the eager loader may decode every image into one host tensor."""
    return decoded_image_bytes(count, image_size) <= memory_budget_bytes(max_memory_gb)


# --------------------------------------------------------------------------- lazy images


class LazyImages(Dataset):  # type: ignore[type-arg]
    """Images decoded from their files on access: uint8 ``(3, S, S)`` per item.

    Stands in for the eager loader's ``(N, 3, S, S)`` uint8 tensor: ``len``, ``shape``,
    ``ndim``, ``dtype``, integer indexing and slicing (a slice decodes only its items).
    Safe to hand to DataLoader workers (it holds paths, not pixels).

    Parameters
    ----------
    file_paths : sequence of Path
        One readable image file per example, in example-id order.
    image_size : int
        Side ``S``; decoding is the eager loader's (``images._decode_image_bytes``).
    """

    dtype = torch.uint8
    ndim = 4

    def __init__(self, file_paths: Sequence[Path], image_size: int) -> None:
        self.file_paths = [str(path) for path in file_paths]
        self.image_size = int(image_size)
        self.shape = torch.Size((len(self.file_paths), 3, self.image_size, self.image_size))

    def __len__(self) -> int:
        return len(self.file_paths)

    def __getitem__(self, index: Any) -> torch.Tensor:
        if isinstance(index, slice):
            positions = range(len(self))[index]
            return self.stack(list(positions))
        if isinstance(index, torch.Tensor):
            index = int(index)
        return torch.from_numpy(self._decode(int(index)))

    def stack(self, positions: Sequence[int]) -> torch.Tensor:
        """The images at ``positions`` as one ``(len(positions), 3, S, S)`` tensor."""
        batch = torch.empty((len(positions), 3, self.image_size, self.image_size), dtype=torch.uint8)
        for row, position in enumerate(positions):
            batch[row] = torch.from_numpy(self._decode(int(position)))
        return batch

    def _decode(self, position: int) -> np.ndarray:
        path = self.file_paths[position]
        try:
            with open(path, "rb") as stream:
                return _decode_image_bytes(stream.read(), self.image_size)
        except Exception as err:  # noqa: BLE001 - a file changed or broken after the pre-scan
            warnings.warn(
                f"image {path} passed the pre-scan but failed to decode ({err}); a black image "
                "stands in for it", RuntimeWarning, stacklevel=2,
            )
            return np.zeros((3, self.image_size, self.image_size), dtype=np.uint8)


def image_statistics(images: LazyImages, *, workers: int = 0, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (population) std over every pixel, in one streamed pass.

    Returns float32 tensors shaped ``(1, 3, 1, 1)``, what ``training.models.standardizer_for``
    computes from an in-memory tensor (accumulated here in float64).
    """
    total = torch.zeros(3, dtype=torch.float64)
    total_squares = torch.zeros(3, dtype=torch.float64)
    order = torch.arange(len(images))
    source = LoaderBatches(images, torch.device("cpu"), workers=workers)
    for _, batch in source.iterate(list(order.split(batch_size))):
        values = batch.to(torch.float64)
        total += values.sum(dim=(0, 2, 3))
        total_squares += values.pow(2).sum(dim=(0, 2, 3))
    source.close()
    count = len(images) * images.image_size**2
    mean = total / count
    variance = (total_squares / count - mean.pow(2)).clamp_min(0)
    return mean.float().reshape(1, 3, 1, 1), variance.sqrt().float().reshape(1, 3, 1, 1)


# --------------------------------------------------------------------------- batch sources


class DeviceBatches:
    """The whole dataset on the training device, indexed per batch (placement "device")."""

    placement = "device"

    def __init__(self, inputs: torch.Tensor, device: torch.device) -> None:
        self.inputs = inputs.to(device)
        self.device = device

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def iterate(self, id_batches: Sequence[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not id_batches:
            return
        # One host-to-device copy per pass: a copy per batch would stall the GPU queue.
        sizes = [int(ids.numel()) for ids in id_batches]
        for ids in torch.cat(list(id_batches)).to(self.device).split(sizes):
            yield ids, self.inputs.index_select(0, ids)

    def close(self) -> None:
        pass


class _IdsAndInputs(Dataset):  # type: ignore[type-arg]
    """Map-style view fetching whole batches: ``__getitems__(ids) -> (ids, inputs)``."""

    def __init__(self, data: torch.Tensor | LazyImages) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([index])

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.as_tensor(indices, dtype=torch.long)
        if isinstance(self.data, LazyImages):
            return ids, self.data.stack(indices)
        return ids, self.data.index_select(0, ids)


class _BatchList:
    """A batch sampler whose batches are set before each pass (persistent workers
    re-iterate the same sampler object)."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _as_batch(batch: Any) -> Any:
    return batch


class LoaderBatches:
    """Batches fetched by a DataLoader (placements "host" and "stream").

    ``workers`` processes fetch (and, for :class:`LazyImages`, decode) whole batches;
    pinned memory and non-blocking copies when the device is CUDA. The batch order is
    the caller's: the sampler only replays the id batches it is given.
    """

    def __init__(self, data: torch.Tensor | LazyImages, device: torch.device, *, workers: int = 0) -> None:
        self.device = device
        self.placement = "stream" if isinstance(data, LazyImages) else "host"
        self._sampler = _BatchList()
        self._length = len(data)
        pin = device.type == "cuda"
        if isinstance(data, torch.Tensor) and pin:
            data = data.contiguous()
        # Host tensors are indexed in the main process (one index_select per batch).
        workers = workers if isinstance(data, LazyImages) else 0
        self.loader = DataLoader(
            _IdsAndInputs(data),
            batch_sampler=self._sampler,
            num_workers=workers,
            collate_fn=_as_batch,
            pin_memory=pin,
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
            # Its own generator: worker seeds must not consume the global RNG stream,
            # so a streamed run draws the same random numbers as an in-memory one.
            generator=torch.Generator().manual_seed(0),
        )

    def __len__(self) -> int:
        return self._length

    def iterate(self, id_batches: Sequence[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._sampler.batches = [ids.tolist() for ids in id_batches]
        for ids, inputs in self.loader:
            yield ids.to(self.device, non_blocking=True), inputs.to(self.device, non_blocking=True)

    def close(self) -> None:
        # Ends persistent workers now rather than at garbage collection.
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader._iterator = None


BatchSource = DeviceBatches | LoaderBatches


def make_batch_source(
    inputs: torch.Tensor | LazyImages,
    device: torch.device,
    *,
    workers: int = 0,
    max_memory_gb: float | None = None,
) -> BatchSource:
    """Pick the placement for ``inputs`` on ``device`` (see the module notes)."""
    if isinstance(inputs, LazyImages):
        return LoaderBatches(inputs, device, workers=workers)
    if device.type == "cpu" or inputs.device.type != "cpu":
        return DeviceBatches(inputs, device)
    size = inputs.element_size() * inputs.numel()
    if device.type == "cuda" and size > memory_budget_bytes(max_memory_gb, device):
        return LoaderBatches(inputs, device, workers=workers)
    return DeviceBatches(inputs, device)
