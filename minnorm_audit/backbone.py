"""Audits through a pretrained backbone: loading it, its preprocessing, and the
frozen-feature cache.

``--backbone`` names one of:

- a torchvision model with its weights enum, ``resnet50`` or ``resnet50:IMAGENET1K_V2``
  (the enum's DEFAULT when none is named); preprocessing is the weights' own
  ``transforms()`` (resize, center crop, normalization);
- a timm model name (when timm is installed); preprocessing from its pretrained config
  (input size, crop fraction, mean and std);
- a TorchScript file (``torch.jit.save``) or an ONNX file (``.onnx``, run with
  onnxruntime, an optional extra): a function from a float batch ``N x 3 x H x W`` in
  ``[0, 1]`` (at ``--image-size``) to features ``N x D``; nothing else is done to the pixels.

Weights come from where the libraries keep them: torchvision's in the torch hub cache
(``$TORCH_HOME/hub/checkpoints``), timm's in the Hugging Face cache; ``--weights FILE``
gives a state dict instead. Offline (no network, or ``MINNORM_AUDIT_OFFLINE=1`` /
``HF_HUB_OFFLINE=1``) with the file absent, :class:`BackboneError` says in one line
which file is missing and where to put it.

Frozen mode (the default): :func:`backbone_cache` computes the features once, in batches
(bf16 autocast on a CUDA GPU; the pixels are preprocessed on the CPU, the same on every
device), and keeps them in the run folder keyed by the data fingerprint and the
backbone, so a resumed run reuses them; the Minnorm head trains on them.
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from torch import nn

from .data.placement import LazyImages

# The default --image-size with a backbone (ImageNet models' crop; without one: 32).
BACKBONE_IMAGE_SIZE = 224
FEATURE_BATCH = 64
CACHE_PREFIX = "features-"


class BackboneError(ValueError):
    """The backbone cannot be used (unknown name, missing weights, bad file); one line."""


@dataclass
class Backbone:
    """A loaded backbone: ``preprocess`` then ``network`` maps images to features.

    Attributes
    ----------
    spec : str
        As given to ``--backbone``.
    kind : {"torchvision", "timm", "torchscript", "onnx"}
    preprocess : nn.Module
        uint8 or ``[0, 1]`` float batch ``(N, C, S, S)`` -> the network's input
        (float32; one channel is repeated to three).
    network : nn.Module or None
        Preprocessed batch -> features ``(N, D)`` (None for ONNX: ``session``).
    weights_file : str or None
        The file the weights were read from.
    weights_sha256 : str or None
        sha256 of that file (or of the state dict's bytes when there is no file).
    preprocessing : str
        What ``preprocess`` does, in words (recorded in summary.json).
    """

    spec: str
    kind: str
    preprocess: nn.Module
    network: nn.Module | None
    weights_file: str | None
    weights_sha256: str | None
    preprocessing: str
    session: Any = field(default=None, repr=False)

    def identity(self) -> str:
        """What the cache key depends on besides the data: kind, spec, weights' hash, preprocessing."""
        return "|".join([self.kind, self.spec, self.weights_sha256 or "", self.preprocessing])

    def describe(self) -> dict[str, Any]:
        return {"spec": self.spec, "kind": self.kind, "weights_file": self.weights_file,
                "weights_sha256": self.weights_sha256, "preprocessing": self.preprocessing}

    @torch.no_grad()
    def features(self, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Features of one batch of images, float32 ``(N, D)`` on the CPU."""
        pixels = self.preprocess(images)
        if self.session is not None:
            name = self.session.get_inputs()[0].name
            out = torch.from_numpy(np.asarray(self.session.run(None, {name: pixels.numpy()})[0]))
        else:
            assert self.network is not None
            pixels = pixels.to(device)
            # bf16 on CUDA (tensor cores); the pixels were made on the CPU either way.
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = self.network(pixels)
        return out.float().reshape(out.shape[0], -1).cpu()


class UnitFloat(nn.Module):
    """uint8 -> float in [0, 1] (float input is taken as already there); one channel -> three."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        return pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels


class Preprocess(nn.Module):
    """:class:`UnitFloat`, then a weights' own transforms (resize, crop, normalization)."""

    def __init__(self, transforms: nn.Module) -> None:
        super().__init__()
        self.unit = UnitFloat()
        self.transforms = transforms

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.transforms(self.unit(images))


def is_offline() -> bool:
    """No download is tried (``MINNORM_AUDIT_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``)."""
    return any(os.environ.get(name, "") not in ("", "0") for name in ("MINNORM_AUDIT_OFFLINE", "HF_HUB_OFFLINE"))


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_backbone(spec: str, *, weights: str | Path | None = None) -> Backbone:
    """The backbone ``spec`` names (see the module docstring), ready for :meth:`Backbone.features`.

    Raises
    ------
    BackboneError
        Unknown name or weights enum, weights absent offline (naming the file and the
        folder to put it in), a file that is neither TorchScript nor ONNX, onnxruntime
        or timm missing for what needs them.
    """
    path = Path(spec).expanduser()
    looks_like_file = path.suffix.lower() in (".onnx", ".pt", ".pth", ".ts", ".torchscript") or "/" in spec
    if looks_like_file or path.is_file():
        if weights is not None:
            raise BackboneError(f"--weights applies to a torchvision or timm name; {spec} is a file that holds its own")
        if not path.is_file():
            raise BackboneError(f"backbone file {spec} does not exist")
        return onnx_backbone(path) if path.suffix.lower() == ".onnx" else torchscript_backbone(path)
    name, _, weights_name = spec.partition(":")
    import torchvision

    if name in torchvision.models.list_models():
        return torchvision_backbone(name, weights_name or None, weights)
    try:
        import timm
    except ImportError:
        timm = None
    if timm is not None and timm.is_model(name):
        if weights_name:
            raise BackboneError(f"--backbone {spec}: a timm name takes no ':WEIGHTS' (use the timm tag, e.g. name.tag)")
        return timm_backbone(name, weights)
    known = "torchvision" + (" or timm" if timm is not None else " (timm is not installed)")
    raise BackboneError(f"--backbone {spec}: not a file and not a {known} model name")


def torchvision_backbone(name: str, weights_name: str | None, weights_file: str | Path | None) -> Backbone:
    """A torchvision classifier with its last linear layer removed (features = its input)."""
    import torchvision

    enum = torchvision.models.get_model_weights(name)
    try:
        chosen = enum.DEFAULT if weights_name is None else enum[weights_name]
    except KeyError:
        choices = ", ".join(member.name for member in enum)
        raise BackboneError(f"--backbone {name}:{weights_name}: no such weights; {name} has {choices}") from None
    model = torchvision.models.get_model(name, weights=None)
    head = _drop_last_linear(model, name)
    if weights_file is not None:
        file = Path(weights_file).expanduser()
    else:
        file = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(chosen.url).path).name
        if not file.is_file():
            _download_or_explain(chosen.url, file, f"{name}:{chosen.name}")
    state = _read_state_dict(file)
    # The removed classifier's weights are not needed (and may be of another width).
    state = {key: value for key, value in state.items() if not key.startswith(head + ".")}
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise BackboneError(f"{file} does not hold {name}'s weights ({first})") from None
    model.eval()
    transforms = chosen.transforms()
    return Backbone(spec=name + ":" + chosen.name if weights_name or weights_file is None else name, kind="torchvision",
                    preprocess=Preprocess(transforms), network=model, weights_file=str(file),
                    weights_sha256=file_sha256(file), preprocessing=" ".join(str(transforms).split()))


def _drop_last_linear(model: nn.Module, name: str) -> str:
    """Replace the model's last ``nn.Linear`` (its classifier) by Identity; its name."""
    linears = [module_name for module_name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise BackboneError(f"--backbone {name}: no final linear layer to remove; export it as a TorchScript "
                            "or ONNX file that returns features")
    parent_name, _, child = linears[-1].rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.Identity())
    return linears[-1]


def _download_or_explain(url: str, file: Path, what: str) -> None:
    """Fetch ``url`` into ``file`` (torch hub), or one line naming the file and the folder."""
    explain = (f"the weights of {what} are not on this machine: put {file.name} (from {url}) in {file.parent} "
               "(TORCH_HOME/hub/checkpoints), or pass --weights FILE")
    if is_offline():
        raise BackboneError(explain)
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(file), progress=False)
    except (OSError, RuntimeError) as error:  # URLError is an OSError
        raise BackboneError(f"{explain} (download failed: {str(error).splitlines()[0] if str(error) else error})") from None


def _read_state_dict(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise BackboneError(f"weights file {file} does not exist")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # a pickle, a zip or garbage: torch raises many kinds
        raise BackboneError(f"{file} is not a torch state dict ({type(error).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BackboneError(f"{file} is not a torch state dict")
    return state


def timm_backbone(name: str, weights_file: str | Path | None) -> Backbone:
    """A timm model without its classifier (``num_classes=0``: pooled features)."""
    import timm
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms._presets import ImageClassification

    overlay = None if weights_file is None else {"file": str(Path(weights_file).expanduser())}
    if weights_file is not None and not Path(weights_file).expanduser().is_file():
        raise BackboneError(f"weights file {weights_file} does not exist")
    if weights_file is None and is_offline():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        model = timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay)
    except (OSError, RuntimeError, ValueError) as error:
        cache = os.environ.get("HF_HUB_CACHE") or os.path.join(os.environ.get("HF_HOME", "~/.cache/huggingface"), "hub")
        raise BackboneError(f"the weights of timm {name} could not be loaded ({str(error).splitlines()[0]}): put them "
                            f"in the Hugging Face cache ({cache}) or pass --weights FILE") from None
    model.eval()
    config = timm.data.resolve_model_data_config(model)
    crop = int(config["input_size"][-1])
    interpolation = {"bicubic": InterpolationMode.BICUBIC}.get(config.get("interpolation"), InterpolationMode.BILINEAR)
    transforms = ImageClassification(crop_size=crop, resize_size=int(crop / config.get("crop_pct", 1.0)),
                                     mean=config["mean"], std=config["std"], interpolation=interpolation)
    if weights_file is not None:
        file, digest = str(Path(weights_file).expanduser()), file_sha256(Path(weights_file).expanduser())
    else:
        file, digest = None, _state_sha256(model)
    return Backbone(spec=name, kind="timm", preprocess=Preprocess(transforms), network=model, weights_file=file,
                    weights_sha256=digest, preprocessing=" ".join(str(transforms).split()))


def _state_sha256(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def torchscript_backbone(path: Path) -> Backbone:
    try:
        with warnings.catch_warnings():  # torch's deprecation notice for jit: not the user's to act on
            warnings.simplefilter("ignore", FutureWarning)
            network = torch.jit.load(str(path), map_location="cpu")
    except Exception as error:  # not a TorchScript archive: torch raises RuntimeError or others
        raise BackboneError(f"--backbone {path}: not a TorchScript file (torch.jit.save) nor an .onnx file "
                            f"({type(error).__name__})") from None
    network.eval()
    return Backbone(spec=str(path), kind="torchscript", preprocess=UnitFloat(), network=network,
                    weights_file=str(path), weights_sha256=file_sha256(path),
                    preprocessing="pixels / 255 (float in [0, 1]), at --image-size")


def onnx_backbone(path: Path) -> Backbone:
    try:
        import onnxruntime
    except ImportError:
        raise BackboneError("an ONNX backbone needs onnxruntime: pip install 'minnorm-audit[onnx]'") from None
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in onnxruntime.get_available_providers()]
    try:
        session = onnxruntime.InferenceSession(str(path), providers=providers)
    except Exception as error:  # onnxruntime's own exception types
        raise BackboneError(f"--backbone {path}: onnxruntime cannot load it ({str(error).splitlines()[0][:200]})") from None
    return Backbone(spec=str(path), kind="onnx", preprocess=UnitFloat(), network=None, weights_file=str(path),
                    weights_sha256=file_sha256(path), preprocessing="pixels / 255 (float in [0, 1]), at --image-size",
                    session=session)


def extract_features(backbone: Backbone, images: torch.Tensor | LazyImages, device: torch.device,
                     *, batch_size: int = FEATURE_BATCH) -> torch.Tensor:
    """Every image's features, float32 ``(N, D)`` on the CPU, ``batch_size`` images at a time."""
    if backbone.network is not None:
        backbone.network.to(device)
    count = len(images)
    blocks = []
    for start in range(0, count, batch_size):
        stop = min(start + batch_size, count)
        batch = images.stack(range(start, stop)) if isinstance(images, LazyImages) else images[start:stop]
        blocks.append(backbone.features(batch, device))
    if backbone.network is not None:
        backbone.network.to("cpu")
    return torch.cat(blocks) if blocks else torch.zeros(0, 0)


def cache_key(fingerprint: str, backbone: Backbone) -> str:
    return hashlib.sha256(f"{fingerprint}|{backbone.identity()}".encode()).hexdigest()


def backbone_cache(backbone: Backbone, images: torch.Tensor | LazyImages, fingerprint: str, run_dir: Path,
                   device: torch.device, *, write: bool = True) -> tuple[torch.Tensor, dict[str, Any]]:
    """The frozen features of ``images``, read from ``run_dir`` when a run with the same
    data and backbone computed them, else computed once and written there.

    Returns the features (float32 ``(N, D)``) and what the summary records of them:
    ``file`` (the cache's name in the run folder), ``key``, ``reused``, ``seconds``,
    ``precision`` and ``feature_dim``.
    """
    from .training.checkpoint import atomic_torch_save

    key = cache_key(fingerprint, backbone)
    path = Path(run_dir) / f"{CACHE_PREFIX}{key[:16]}.pt"
    if path.is_file():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if stored.get("key") == key and int(stored["features"].shape[0]) == len(images):
            return stored["features"], {"file": path.name, "key": key, "reused": True,
                                        "seconds": float(stored["seconds"]), "precision": stored["precision"],
                                        "feature_dim": int(stored["features"].shape[1])}
    started = time.perf_counter()
    features = extract_features(backbone, images, device)
    seconds = time.perf_counter() - started
    if not bool(torch.isfinite(features).all()):
        raise BackboneError(f"--backbone {backbone.spec} returned NaN or inf features for these images")
    precision = "bfloat16" if device.type == "cuda" and backbone.network is not None else "float32"
    if write:
        atomic_torch_save({"key": key, "features": features, "seconds": seconds, "precision": precision,
                           "backbone": backbone.describe()}, path)
    return features, {"file": path.name, "key": key, "reused": False, "seconds": seconds, "precision": precision,
                      "feature_dim": int(features.shape[1])}


class FinetuneNetwork(nn.Sequential):
    """The whole backbone and a linear head, trained together (``--finetune``): images
    in, ``num_outputs`` scores out. The head starts at zero, so the network starts at the
    pretrained function and the norm of the change is measured from there."""

    def __init__(self, backbone: Backbone, feature_dim: int, num_outputs: int) -> None:
        if backbone.network is None:
            raise BackboneError(f"--finetune needs a torch backbone; {backbone.spec} is {backbone.kind} (frozen only)")
        head = nn.Linear(feature_dim, num_outputs)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        super().__init__(backbone.preprocess, backbone.network, nn.Flatten(), head)
