"""User plug-ins by `_target_`: models (from a checkpoint, or trained here), datasets,
their settings, and the one-line errors of each way they can be wrong."""

from __future__ import annotations

import json
import sys
from functools import partial

import pandas as pd
import pytest
import torch
from torch import nn

from sanity_cli import pipeline, plugins
from sanity_cli.data import load_dataset, load_digits
from sanity_cli.errors import SanityError
from sanity_cli.methods.gradcam import default_gradcam_layer
from sanity_cli.models import InputSpec, build_model, input_spec

USER_MODELS = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, width=4, num_classes=10, in_channels=1):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(width * 14 * 14, num_classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def not_a_model(**kwargs):
    return {"weights": 1}


def wide_net(num_classes=10):
    return Net(width=6, num_classes=num_classes)
'''

USER_DATA = '''
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, TensorDataset


def tensors(n=12, size=16, channels=1, low=0.0, high=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = low + (high - low) * torch.rand(n, channels, size, size, generator=generator)
    return TensorDataset(x, torch.arange(n) % 3)


class Photos(Dataset):
    """PIL images of two sizes, labels listed in `targets` and named in `classes`."""
    classes = ["cat", "dog"]

    def __init__(self, n=6):
        self.targets = [i % 2 for i in range(n)]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        side = 20 if i % 2 else 24
        array = np.full((side, side + 8, 3), 40 * i, dtype=np.uint8)
        return Image.fromarray(array), self.targets[i]


def a_list():
    return [(torch.zeros(1, 8, 8), 0)]


def unpaired(n=3):
    return TensorDataset(torch.zeros(n, 1, 8, 8))
'''


@pytest.fixture
def user_code(tmp_path, monkeypatch):
    """The user's modules, importable as they would be with PYTHONPATH=; each test
    imports its own copy."""
    (tmp_path / "user_models.py").write_text(USER_MODELS)
    (tmp_path / "user_data.py").write_text(USER_DATA)
    monkeypatch.syspath_prepend(str(tmp_path))
    names = ("user_models", "user_data", "broken_import", "broken_syntax")
    for name in names:
        sys.modules.pop(name, None)
    yield tmp_path
    for name in names:
        sys.modules.pop(name, None)


def one_line_error(call) -> str:
    with pytest.raises(SanityError) as caught:
        call()
    assert "\n" not in str(caught.value)
    return str(caught.value)


@pytest.mark.parametrize("path, expected", [
    ("???", "model._target_ is not set; give an import path"),
    ("no_such_package.Net", "model._target_ 'no_such_package.Net': no module named 'no_such_package'; is its "
                            "folder on the Python path? e.g. PYTHONPATH=. sanity run"),
    ("user_models.Nett", "model._target_ 'user_models.Nett': user_models has no attribute 'Nett'"),
    ("broken_import.Net", "importing broken_import failed: ModuleNotFoundError: No module named 'missing_dep'"),
    ("broken_syntax.Net", "importing broken_syntax failed: SyntaxError"),
])
def test_a_target_that_cannot_be_imported_is_one_line(user_code, path, expected):
    (user_code / "broken_import.py").write_text("import missing_dep\n")
    (user_code / "broken_syntax.py").write_text("def f(:\n")
    assert expected in one_line_error(lambda: plugins.locate(path, "model._target_"))


def test_the_model_gets_its_keyword_arguments_and_must_be_a_module(user_code, make_cfg):
    cfg = make_cfg(["model=custom", "model._target_=user_models.Net", "+model.width=5"])
    model = plugins.build_module(cfg.model)
    assert model.features[0].out_channels == 5  # +model.width reached the class; the settings did not
    bad = make_cfg(["model=custom", "model._target_=user_models.not_a_model"])
    assert "returned dict, not a torch nn.Module" in one_line_error(lambda: plugins.build_module(bad.model))
    wrong = make_cfg(["model=custom", "model._target_=user_models.Net", "+model.depth=3"])
    message = one_line_error(lambda: plugins.build_module(wrong.model))
    assert "model._target_ 'user_models.Net' failed: TypeError:" in message and "'depth'" in message
    nested = {"_target_": "torch.nn.Sequential", "_args_": [{"_target_": "torch.nn.Flatten"}]}
    assert isinstance(plugins.instantiate(nested, "model")[0], nn.Flatten)


def test_a_custom_model_must_fit_its_input_and_classes(user_code, make_cfg):
    cfg = make_cfg(["model=custom", "model._target_=user_models.Net"])
    spec = input_spec(cfg.model, 1, 28)
    assert build_model(cfg.model, 10, spec).head.out_features == 10
    message = one_line_error(lambda: build_model(cfg.model, 10, InputSpec(1, 32, (0.0,), (1.0,))))
    assert "model custom fails on a (2, 1, 32, 32) input (RuntimeError:" in message
    assert "set model.channels and model.input_size" in message
    message = one_line_error(lambda: build_model(cfg.model, 4, spec))
    assert message.startswith("model custom has 10 outputs but the dataset has 4 classes")


def test_input_settings_override_the_defaults(make_cfg):
    cfg = make_cfg(["model=custom", "model.channels=3", "model.input_size=32", "model.mean=[0.5,0.4,0.3]",
                    "model.std=0.25"])
    spec = input_spec(cfg.model, 1, 28)
    assert spec == InputSpec(3, 32, (0.5, 0.4, 0.3), (0.25, 0.25, 0.25))
    x = torch.ones(1, 3, 2, 2)
    assert torch.allclose(spec.normalize(x)[0, :, 0, 0], torch.tensor([2.0, 2.4, 2.8]))
    assert input_spec(make_cfg(["model=custom"]).model, 1, 28) == InputSpec(1, 28, (0.0,), (1.0,))
    timm_spec = input_spec(make_cfg(["model=timm", "model.name=test_resnet"]).model, 1, 28)
    assert timm_spec == InputSpec(3, 160, (0.5,) * 3, (0.5,) * 3)  # timm's pretrained configuration
    for override, expected in [("model.std=[1,2]", "model.std has 2 values for 1 input channels"),
                               ("model.std=0", "model.std must be above 0"),
                               ("model.input_size=0", "model.input_size must be a whole number of at least 1"),
                               ("model.mean=dark", "model.mean must be a number or a list of numbers")]:
        bad = make_cfg(["model=custom", override])
        assert expected in one_line_error(partial(input_spec, bad.model, 1, 28))


def test_the_default_gradcam_layer_is_the_last_spatial_module_run_once(user_code):
    import user_models

    model = user_models.Net().eval()
    assert default_gradcam_layer(model, torch.zeros(1, 1, 28, 28)) == "features"  # completes after its pool

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.pool, self.fc = nn.Conv2d(1, 2, 3, padding=1), nn.MaxPool2d(2), nn.Linear(2 * 7 * 7, 3)

        def forward(self, x):
            return self.fc(self.pool(self.pool(self.conv(x))).flatten(1))

    assert default_gradcam_layer(Twice().eval(), torch.zeros(1, 1, 28, 28)) == "conv"
    assert default_gradcam_layer(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), torch.zeros(1, 1, 2, 2)) is None


def test_the_source_fingerprint_follows_the_models_code(user_code):
    before = plugins.source_fingerprint("user_models.Net")
    assert plugins.source_fingerprint("user_models.wide_net") == before  # same file
    (user_code / "user_models.py").write_text(USER_MODELS + "\n# edited\n")
    assert plugins.source_fingerprint("user_models.Net") != before


@pytest.fixture
def run(make_cfg, tmp_path):
    def run(overrides, name="run"):
        cfg = make_cfg(["n_images=4", "n_examples=1", "device=cpu", "method=[gradient,gradcam]",
                        "metrics.names=[spearman_abs]", f"cache_dir={tmp_path / 'cache'}", *overrides])
        return pipeline.run(cfg, tmp_path / name)

    return run


def test_a_custom_model_is_checked_from_its_checkpoint(user_code, run):
    import user_models

    torch.manual_seed(5)
    trained = user_models.Net(width=3).eval()
    torch.save(trained.state_dict(), user_code / "net.pt")
    result = run(["model=custom", "model._target_=user_models.Net", "+model.width=3",
                  f"model.checkpoint={user_code / 'net.pt'}", "model.name=mynet"])
    rows = result.results
    assert set(rows["model"]) == {"mynet"} and set(rows["block"]) == {"original", "head", "features"}
    # Step 0 explains the checkpoint's own predictions on the same digits.
    step0 = rows[(rows["step"] == 0) & (rows["method"] == "gradient")].drop_duplicates("image")
    test = load_digits(28, 0.2, 0)
    with torch.no_grad():
        expected = trained(test.test_x[torch.tensor(step0["image"].tolist())]).argmax(1)
    assert step0["target"].tolist() == expected.tolist()


def test_a_custom_model_without_checkpoint_is_trained_and_cached(user_code, run, tmp_path):
    first = run(["model=custom", "model._target_=user_models.Net", "train.epochs=1"], name="first")
    cached = list((tmp_path / "cache").glob("custom-*.pt"))
    assert len(cached) == 1
    saved = torch.load(cached[0], weights_only=True)
    assert saved["state_dict"]["features.0.weight"].shape == (4, 1, 3, 3)
    models = json.loads((first.run_dir / "run.json").read_text())["models"]
    assert 0.1 < models["trained"]["train_accuracy"] <= 1.0
    run(["model=custom", "model._target_=user_models.Net", "train.epochs=1"], name="again")
    assert len(list((tmp_path / "cache").glob("custom-*.pt"))) == 1  # loaded, not trained again
    run(["model=custom", "model._target_=user_models.Net", "train.epochs=1", "+model.width=6"], name="wide")
    assert len(list((tmp_path / "cache").glob("custom-*.pt"))) == 2  # another architecture, another model


def test_a_custom_dataset_from_tensors_with_a_training_split(user_code, make_cfg):
    cfg = make_cfg(["dataset=custom", "dataset._target_=user_data.tensors", "+dataset.n=9",
                    "dataset.train_split={_target_: user_data.tensors, n: 30, seed: 1}"])
    data = load_dataset(cfg.dataset, data_dir=".", seed=0, n_images=5, image_size=16)
    assert data.test_x.shape == (5, 1, 16, 16) and data.train_x.shape == (30, 1, 16, 16)
    assert data.classes == ["0", "1", "2"] and data.name == "custom"
    full = load_dataset(cfg.dataset, data_dir=".", seed=0, n_images=9, image_size=16)
    assert torch.equal(full.test_x, plugins.build_dataset(cfg.dataset, "dataset").tensors[0])


def test_a_torchvision_dataset_class_with_its_arguments(make_cfg):
    cfg = make_cfg(["dataset=custom", "dataset._target_=torchvision.datasets.FakeData", "+dataset.size=6",
                    "+dataset.image_size=[3,20,30]", "+dataset.num_classes=4",
                    "+dataset.transform={_target_: torchvision.transforms.ToTensor}"])
    data = load_dataset(cfg.dataset, data_dir=".", seed=0, n_images=6, image_size=16)
    assert data.test_x.shape == (6, 3, 16, 16)  # 20x30 images resized and center-cropped
    assert 0 <= data.test_x.min() and data.test_x.max() <= 1 and set(data.test_y.tolist()) <= {0, 1, 2, 3}


def test_pil_images_of_several_sizes_balanced_by_targets(user_code, make_cfg):
    cfg = make_cfg(["dataset=custom", "dataset._target_=user_data.Photos"])
    data = load_dataset(cfg.dataset, data_dir=".", seed=0, n_images=4, image_size=12)
    assert data.test_x.shape == (4, 3, 12, 12) and data.classes == ["cat", "dog"]
    assert sorted(data.test_y.tolist()) == [0, 0, 1, 1]
    levels = data.test_x.flatten(1).mean(1) * 255 / 40  # uniform images keep their value, 40 * i / 255
    assert torch.allclose(levels, levels.round(), atol=1e-3) and len(set(levels.round().tolist())) == 4


@pytest.mark.parametrize("overrides, expected", [
    (["dataset._target_=user_data.a_list"], "returned list, not a map-style torch Dataset"),
    (["dataset._target_=user_data.unpaired"], "item 0 is a tuple"),
    (["dataset._target_=user_data.tensors", "+dataset.high=2.5"], "has values in [0.0"),
    (["dataset._target_=user_data.tensors", "+dataset.channels=2"], "has shape (2, 16, 16)"),
    ([], "dataset._target_ is not set"),
])
def test_bad_datasets_are_one_line_errors(user_code, make_cfg, overrides, expected):
    cfg = make_cfg(["dataset=custom", *overrides])
    message = one_line_error(lambda: load_dataset(cfg.dataset, data_dir=".", seed=0, n_images=2, image_size=16))
    assert expected in message


def test_a_custom_dataset_through_the_pipeline(user_code, run):
    result = run(["dataset=custom", "dataset._target_=user_data.tensors", "+dataset.size=28", "+dataset.n=60",
                  "dataset.train_split={_target_: user_data.tensors, n: 60, size: 28}", "train.epochs=1",
                  "dataset.name=noise"])
    assert set(result.results["dataset"]) == {"noise"} and result.results["image"].nunique() == 4
    assert pd.notna(result.results["value"]).all()
