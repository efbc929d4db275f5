"""User plug-ins named by import path, the Hydra way (`_target_`).

A model (`model=custom model._target_=pkg.Net`), a dataset (`dataset=custom
dataset._target_=torchvision.datasets.FashionMNIST`) or a method function
(`method=callable method.callable._target_=pkg.saliency`) is resolved here, and
only here. Every way this can go wrong (a path that does not import, a call that
fails, an object of the wrong type) becomes a one-line SanityError that names the
setting, never a traceback from inside Hydra.

The other keys of a `_target_` config are the callable's keyword arguments, less the
project's own settings of that group (e.g. `checkpoint` of a model); nested
`_target_` configs are instantiated first, lists and dicts arrive as plain Python.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import Dataset, IterableDataset

from sanity_cli.errors import SanityError, one_line

# The project's settings of a model config; every other key goes to the model's callable.
MODEL_SETTINGS = frozenset({"kind", "name", "pretrained", "checkpoint", "gradcam_layer", "input_size", "mean",
                            "std", "channels"})
# The project's settings of a custom dataset config.
DATASET_SETTINGS = frozenset({"kind", "name", "train_split"})
MISSING = "???"


def plain(node: Any) -> Any:
    """A config node as plain Python (dicts, lists, scalars); plain values pass through."""
    if isinstance(node, DictConfig) or OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def locate(path: Any, setting: str) -> Any:
    """The object that the dotted import `path` names, e.g. 'torchvision.datasets.MNIST'.

    `setting` names the config key in messages (e.g. 'model._target_').
    """
    if not isinstance(path, str) or not path.strip() or path == MISSING:
        raise SanityError(f"{setting} is not set; give an import path, e.g. {setting}=mypackage.module.Name")
    parts = path.strip().split(".")
    obj = _import(parts[0], setting, path)
    if obj is None:
        raise SanityError(f"{setting} '{path}': no module named '{parts[0]}'; is its folder on the Python path? "
                          f"e.g. PYTHONPATH=. sanity run ...")
    for i in range(1, len(parts)):
        if hasattr(obj, parts[i]):
            obj = getattr(obj, parts[i])
        elif inspect.ismodule(obj) and (module := _import(".".join(parts[: i + 1]), setting, path)) is not None:
            obj = module  # a submodule that its package does not import itself
        else:
            raise SanityError(f"{setting} '{path}': {'.'.join(parts[:i])} has no attribute '{parts[i]}'; "
                              "check the spelling")
    return obj


def _import(name: str, setting: str, path: str) -> Any:
    """The module `name`, or None where there is no such module."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name == name:  # missing itself; a module it imports missing is the user's to hear about
            return None
        raise SanityError(f"{setting} '{path}': importing {name} failed: {one_line(error)}") from None
    except Exception as error:  # noqa: BLE001 - any error while importing user code is reported in one line
        raise SanityError(f"{setting} '{path}': importing {name} failed: {one_line(error)}") from None


def instantiate(node: Any, setting: str, drop: Iterable[str] = ()) -> Any:
    """Call `node['_target_']` with the node's other keys (less `drop`) as keyword arguments.

    Hydra's instantiate does the call, so nested `_target_` configs and `_args_` work
    as in any Hydra application.
    """
    config = {key: value for key, value in (plain(node) or {}).items() if key not in set(drop)}
    target = config.get("_target_")
    locate(target, f"{setting}._target_")  # a one-line message for a path that does not import
    config.setdefault("_convert_", "all")
    try:
        return hydra_instantiate(config)
    except InstantiationException as error:
        cause = error.__cause__ or error
        raise SanityError(f"{setting}._target_ '{target}' failed: {one_line(cause)}; "
                          f"check the other {setting}.* settings (its arguments)") from None


def keyword_arguments(node: Any, setting: str) -> dict[str, Any]:
    """A mapping of keyword arguments, with any nested `_target_` configs instantiated."""
    values = plain(node)
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise SanityError(f"{setting} must be a mapping of argument names to values, e.g. {setting}={{eps: 1e-6}}; "
                          f"got '{values}'")
    try:
        return dict(hydra_instantiate(dict(values), _convert_="all"))
    except InstantiationException as error:
        raise SanityError(f"{setting}: {one_line(error.__cause__ or error)}") from None


def build_module(model_cfg: Any) -> nn.Module:
    """The nn.Module that `model._target_` returns, called with the model config's
    other keys (not the project's settings, MODEL_SETTINGS) as keyword arguments."""
    model = instantiate(model_cfg, "model", drop=MODEL_SETTINGS)
    if not isinstance(model, nn.Module):
        raise SanityError(f"model._target_ '{plain(model_cfg)['_target_']}' returned {type(model).__name__}, "
                          "not a torch nn.Module; name a class or function that returns one")
    return model


def build_dataset(node: Any, setting: str) -> Dataset:
    """The map-style torch Dataset that `<setting>._target_` returns; its items are
    (image, label) pairs."""
    dataset = instantiate(node, setting, drop=DATASET_SETTINGS)
    if not isinstance(dataset, Dataset) or isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        kind = "an IterableDataset" if isinstance(dataset, IterableDataset) else type(dataset).__name__
        raise SanityError(f"{setting}._target_ '{plain(node)['_target_']}' returned {kind}, not a map-style "
                          "torch Dataset; return a torch.utils.data.Dataset of (image, label) pairs "
                          "(e.g. wrap tensors in torch.utils.data.TensorDataset)")
    return dataset


def method_function(options: Mapping[str, Any], setting: str) -> tuple[Callable[..., Any], dict[str, Any]]:
    """The function a plugged method names in `_target_`, and its keyword arguments
    (the other keys of `options` but `method`)."""
    function = locate(options.get("_target_"), f"{setting}._target_")
    if not callable(function):
        raise SanityError(f"{setting}._target_ '{options['_target_']}' is a {type(function).__name__}, not a "
                          "function; name a function fn(model, x, target, **kwargs)")
    kwargs = keyword_arguments({k: v for k, v in options.items() if k not in ("_target_", "method")}, setting)
    return function, kwargs


def source_fingerprint(path: str) -> str:
    """A hash of the source file that defines the object at import `path`.

    Part of the cache key of a model trained here: editing the model's code trains
    anew instead of loading weights of the old code.
    """
    obj = locate(path, "model._target_")
    try:
        source = Path(inspect.getfile(inspect.unwrap(obj))).read_bytes()
    except (TypeError, OSError):  # built-in or generated: its import path is all there is
        source = path.encode()
    return hashlib.sha256(source).hexdigest()[:16]
