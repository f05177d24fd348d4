"""--backbone: loading each format (small random-weight models saved here, no download),
the weights' own preprocessing, the feature cache, offline errors, and the audit through it."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import minnorm_audit
from minnorm_audit.backbone import BackboneError, backbone_cache, extract_features, load_backbone
from minnorm_audit.cli import main

CPU = torch.device("cpu")


class Tiny(nn.Module):
    """[0, 1] pixels -> 32 features (conv, ReLU, 2 x 2 average pool)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(torch.relu(self.conv(pixels))), 1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    return Tiny().eval()


@pytest.fixture(scope="module")
def script_file(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("bb") / "tiny.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(tiny).save(str(path))
    return path


def images(count=6, side=16, seed=0):
    return torch.randint(0, 256, (count, 3, side, side), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def test_torchscript_file_gets_pixels_in_unit_range(tiny, script_file):
    batch = images()
    features = extract_features(load_backbone(str(script_file)), batch, CPU, batch_size=4)
    with torch.no_grad():
        expected = tiny(batch.float() / 255.0)
    assert features.shape == (6, 32)
    torch.testing.assert_close(features, expected)


def test_onnx_file_gives_the_torchscript_features(tiny, script_file, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    path = tmp_path / "tiny.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(tiny, (images(2).float() / 255,), str(path), input_names=["x"],
                          dynamic_axes={"x": {0: "n"}}, dynamo=False)
    backbone = load_backbone(str(path))
    assert backbone.kind == "onnx" and len(backbone.weights_sha256) == 64
    batch = images(5, seed=1)
    torch.testing.assert_close(extract_features(backbone, batch, CPU),
                               extract_features(load_backbone(str(script_file)), batch, CPU), atol=1e-5, rtol=1e-5)


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    """An empty torch hub cache, offline."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("MINNORM_AUDIT_OFFLINE", "1")
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.mark.slow
def test_torchvision_name_reads_the_hub_cache_and_uses_the_weights_transforms(hub):
    import torchvision

    weights = torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1
    torch.manual_seed(0)
    reference = torchvision.models.mobilenet_v3_small().eval()
    hub.mkdir(parents=True)
    torch.save(reference.state_dict(), hub / "mobilenet_v3_small-047dcff4.pth")  # the file torchvision looks for
    backbone = load_backbone("mobilenet_v3_small:IMAGENET1K_V1")
    assert backbone.weights_file.endswith("mobilenet_v3_small-047dcff4.pth")
    assert "crop_size=[224]" in backbone.preprocessing and "0.485" in backbone.preprocessing
    batch = images(2, side=40)
    reference.classifier[-1] = nn.Identity()
    with torch.no_grad():
        expected = reference(weights.transforms()(batch.float() / 255.0))
    features = extract_features(backbone, batch, CPU)
    assert features.shape == (2, 1024)
    torch.testing.assert_close(features, expected)


def test_absent_weights_offline_name_the_file_and_the_folder(hub):
    with pytest.raises(BackboneError) as error:
        load_backbone("mobilenet_v3_small")
    message = str(error.value)
    assert "\n" not in message
    assert "mobilenet_v3_small-047dcff4.pth" in message and str(hub) in message and "--weights" in message


def test_weights_file_and_bad_names_are_one_line(hub, tmp_path):
    import torchvision

    torch.manual_seed(1)
    model = torchvision.models.mobilenet_v3_small()
    torch.save(model.state_dict(), tmp_path / "mine.pth")
    backbone = load_backbone("mobilenet_v3_small", weights=tmp_path / "mine.pth")
    assert backbone.weights_file == str(tmp_path / "mine.pth")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(BackboneError, match="does not hold mobilenet_v3_small's weights"):
        load_backbone("mobilenet_v3_small", weights=tmp_path / "other.pth")
    with pytest.raises(BackboneError, match="no such weights; mobilenet_v3_small has IMAGENET1K_V1"):
        load_backbone("mobilenet_v3_small:IMAGENET9K")
    with pytest.raises(BackboneError, match="not a file and not a torchvision"):
        load_backbone("no_such_net")
    with pytest.raises(BackboneError, match="backbone file .*gone.pt does not exist"):
        load_backbone(str(tmp_path / "gone.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(BackboneError, match="not a TorchScript file"):
        load_backbone(str(tmp_path / "junk.pt"))


def test_timm_name_with_a_weights_file(hub, tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    reference = timm.create_model("test_resnet", pretrained=False)
    torch.save(reference.state_dict(), tmp_path / "test_resnet.pth")
    backbone = load_backbone("test_resnet", weights=tmp_path / "test_resnet.pth")
    assert backbone.kind == "timm"
    reference.reset_classifier(0)
    config = timm.data.resolve_model_data_config(reference)
    batch = images(2, side=int(config["input_size"][-1]))
    assert str(tuple(round(m, 3) for m in config["mean"])[0]) in backbone.preprocessing
    features = extract_features(backbone, batch, CPU)
    assert features.shape == (2, reference.num_features)
    assert torch.isfinite(features).all()


def test_feature_cache_is_reused_for_the_same_data_and_backbone_only(script_file, tmp_path, monkeypatch):
    backbone = load_backbone(str(script_file))
    batch = images(4)
    first, info = backbone_cache(backbone, batch, "fp-a", tmp_path, CPU)
    assert not info["reused"] and (tmp_path / info["file"]).is_file()
    calls = []
    monkeypatch.setattr("minnorm_audit.backbone.extract_features", lambda *a, **k: calls.append(1))
    again, info_again = backbone_cache(backbone, batch, "fp-a", tmp_path, CPU)
    assert info_again["reused"] and not calls
    torch.testing.assert_close(again, first)
    with pytest.raises(TypeError):  # another fingerprint: computed again (the stub returns None)
        backbone_cache(backbone, batch, "fp-b", tmp_path, CPU)
    assert calls == [1]


def separable_images(per_class=20, side=16, seed=0):
    """Three clearly different things: bright top half, bright left half, dark with a bright centre."""
    rng = np.random.default_rng(seed)
    out, labels = [], []
    for label in range(3):
        for _ in range(per_class):
            image = rng.integers(0, 60, (3, side, side))
            if label == 0:
                image[:, : side // 2] += 180
            elif label == 1:
                image[:, :, : side // 2] += 180
            else:
                image[:, side // 4: 3 * side // 4, side // 4: 3 * side // 4] += 180
            out.append(image.clip(0, 255).astype(np.uint8))
            labels.append(label)
    return np.stack(out), np.array(labels)


@pytest.mark.slow
def test_audit_through_a_frozen_backbone_records_it_and_reuses_the_cache(script_file, tmp_path):
    x, y = separable_images()
    y[[0, 25, 45]] = [1, 2, 0]  # three flips
    result = minnorm_audit.audit((x, y), out=tmp_path / "run", backbone=str(script_file), image_size=16,
                                 device="cpu", seed=0)
    record = result.summary["backbone"]
    assert record["mode"] == "frozen" and record["kind"] == "torchscript" and record["head"] == "linear"
    assert len(record["weights_sha256"]) == 64 and record["feature_cache"]["feature_dim"] == 32
    assert (tmp_path / "run" / record["feature_cache"]["file"]).is_file() and not record["feature_cache"]["reused"]
    assert not result.summary["inconclusive"], result.summary["inconclusive"]
    # The three flips are the three most difficult examples, and none is called ok.
    top = result.examples.sort_values("difficulty", ascending=False).head(3)
    assert set(top["source"]) == {"0", "25", "45"}
    assert (top["flag"] != "ok").all() and (top["flag"] == "mislabeled").sum() >= 2
    again = minnorm_audit.audit((x, y), out=tmp_path / "run", backbone=str(script_file), image_size=16,
                                device="cpu", seed=0)
    assert again.summary["backbone"]["feature_cache"]["reused"]
    np.testing.assert_allclose(again.examples["difficulty"], result.examples["difficulty"], rtol=1e-5, atol=1e-6)
    import pandas as pd

    # The gallery still shows the images (thumbnails), not feature rows.
    assert pd.read_parquet(tmp_path / "run" / "gallery.parquet")["thumbnail_png"].notna().all()


def test_finetune_trains_the_whole_network_from_the_pretrained_weights(script_file, tmp_path):
    from minnorm_audit.audit import AuditOptions, TrainConfig, train, training_targets
    from minnorm_audit.data import load_arrays

    x, y = separable_images(per_class=8)
    loaded = load_arrays(x, y, image_size=16)
    settings = AuditOptions(backbone=str(script_file), finetune=True, image_size=16,
                            train=TrainConfig(epochs=3, batch_size=8, device="cpu"))
    result = train(loaded, settings, training_targets(loaded), tmp_path, resume=False, progress=False)
    optimizer = result.minnorm
    pretrained = torch.jit.load(str(script_file)).state_dict()
    anchors = {tuple(a.shape): a for a in optimizer.norm_anchors}
    # The conv weight is anchored at its pretrained value; the new head at zero.
    torch.testing.assert_close(anchors[(8, 3, 3, 3)], pretrained["conv.weight"])
    assert float(anchors[(3, 32)].abs().max()) == 0.0
    conv = next(p for p in optimizer.norm_parameters if p.shape == (8, 3, 3, 3))
    assert not torch.equal(conv.detach(), pretrained["conv.weight"])  # the backbone trained too
    change = 0.5 * sum(float((p.detach() - a).pow(2).sum()) for p, a in zip(optimizer.norm_parameters,
                                                                              optimizer.norm_anchors))
    assert optimizer.norm_value() == pytest.approx(change)


def test_cli_missing_weights_and_help(hub, tmp_path):
    x, _ = separable_images(per_class=2)
    folder = tmp_path / "photos"
    from PIL import Image

    for index, image in enumerate(x):
        (folder / f"c{index % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.transpose(1, 2, 0)).save(folder / f"c{index % 2}" / f"{index}.png")
    runner = CliRunner()
    outcome = runner.invoke(main, ["run", str(folder), "--backbone", "mobilenet_v3_small", "--out",
                                   str(tmp_path / "out"), "--quiet"])
    assert outcome.exit_code == 1
    assert "mobilenet_v3_small-047dcff4.pth" in outcome.output and "TORCH_HOME" in outcome.output
    help_text = runner.invoke(main, ["run", "--help"]).output
    assert "N x 3 x H x W in [0, 1]" in " ".join(help_text.split()) and "--finetune" in help_text


def test_page_shows_the_backbone(script_file, tmp_path):
    x, y = separable_images(per_class=6)
    result = minnorm_audit.audit((x, y), out=tmp_path / "run", backbone=str(script_file), image_size=16,
                                 device="cpu", epochs=2)
    page = (tmp_path / "run" / "report.html").read_text()
    assert ">Backbone<" in page and result.summary["backbone"]["weights_sha256"] in page
    assert "feature_cache.file" in page and result.summary["backbone"]["feature_cache"]["file"] in page


def test_inconclusive_image_audit_from_scratch_names_backbone(tmp_path):
    x, y = separable_images(per_class=6)
    # A learning rate too small to learn anything: the audit must be inconclusive.
    result = minnorm_audit.audit((x, y), out=tmp_path / "run", image_size=16, device="cpu", epochs=1, lr=1e-7)
    assert result.summary["inconclusive"] and "--backbone" in result.summary["inconclusive"]["reason"]
    table = minnorm_audit.audit((x.reshape(len(x), -1)[:, :20].astype(np.float32), y), out=tmp_path / "table",
                                device="cpu", epochs=1, lr=1e-7)
    assert table.summary["inconclusive"] and "--backbone" not in table.summary["inconclusive"]["reason"]


def test_small_data_rule_and_image_size_default():
    from minnorm_audit.options import AuditOptions
    from minnorm_audit.training import default_batch_size

    assert [default_batch_size(n) for n in (20, 100, 300, 1023, 1024, 50_000)] == [8, 12, 37, 127, 128, 128]
    assert AuditOptions().resolved_image_size() == 32
    assert AuditOptions(backbone="resnet50").resolved_image_size() == 224
    assert AuditOptions(backbone="resnet50", image_size=64).resolved_image_size() == 64
