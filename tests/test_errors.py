"""errors.one_line, the one way another library's exception becomes part of a one-line
message, and the one place the CLI leans on Hydra's private API."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError

import sanity_cli
from sanity_cli.errors import one_line


def test_omegaconfs_message_keeps_its_sentence_without_the_indented_details():
    cfg = OmegaConf.create({"epochs": 1})
    OmegaConf.set_struct(cfg, True)
    with pytest.raises(ConfigAttributeError) as caught:
        _ = cfg.epoch
    assert "\n    full_key: epoch" in str(caught.value)  # what one_line leaves out
    assert one_line(caught.value) == "Key 'epoch' is not in struct"


def test_hydras_message_keeps_its_first_two_sentences():
    error = ConfigCompositionException("Could not override 'n_imags'.\nTo append to your config use +n_imags=4\n"
                                       "Key 'n_imags' is not in struct\n    full_key: n_imags")
    assert one_line(error) == "Could not override 'n_imags'. To append to your config use +n_imags=4"


def test_another_librarys_error_is_named_by_its_type_on_one_line_cut_at_240_characters():
    assert one_line(ModuleNotFoundError("No module named 'missing_dep'")) == \
        "ModuleNotFoundError: No module named 'missing_dep'"
    long = one_line(TypeError("forward() got\n   an unexpected keyword " + "x" * 400))
    assert long.startswith("TypeError: forward() got an unexpected keyword xx") and "\n" not in long
    assert len(long) == len("TypeError: ") + 240
    assert one_line(RuntimeError()) == "RuntimeError"


def test_hydras_private_api_is_imported_in_one_function_only():
    """hydra._internal may change in any Hydra release: the CLI's one use is cli.hydra_arguments."""
    found = []
    for path in sorted(Path(sanity_cli.__file__).parent.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for function in [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef))]:
            for node in ast.iter_child_nodes(function) if function is tree else ast.walk(function):
                names = ([node.module or ""] if isinstance(node, ast.ImportFrom) else
                         [a.name for a in node.names] if isinstance(node, ast.Import) else [])
                if any(name.startswith("hydra._internal") for name in names):
                    found.append((path.name, getattr(function, "name", "<module>")))
    assert found == [("cli.py", "hydra_arguments")], found
