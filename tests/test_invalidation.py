"""No stale features: anything that changes stored values gives a new entry."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from cachedfeatures import CachedFeatureDataset, FeatureStore, NonDeterministicDatasetError
from tests.helpers import ROOT, Backbone, Samples, reference


def _entry_names(store_path) -> set[str]:
    return {entry.name for entry in FeatureStore.open(store_path).entries}


def _fill(data, module, store_path, **kwargs: Any) -> CachedFeatureDataset:
    cached = CachedFeatureDataset(data, module, store_path, batch_size=32, **kwargs)
    cached.__getitems__(list(range(len(data))))
    return cached


def test_same_module_and_data_reuse_the_entry(store_path) -> None:
    first = _fill(Samples(30), Backbone(seed=0), store_path)
    module = Backbone(seed=0)  # a new instance with the same weights
    data = Samples(30)
    again = CachedFeatureDataset(data, module, store_path)
    assert again.entry_name == first.entry_name
    loads = data.loads
    again.__getitems__(list(range(30)))
    # Every row a hit: the only module call and raw loads are the spot check's, which passed.
    assert module.calls == again.spot_check_calls == 1
    assert data.loads == loads + len(again.spot_checked_rows) == loads + 8


def test_changing_one_weight_gives_a_new_entry_and_keeps_the_old(store_path) -> None:
    data = Samples(30)
    old = _fill(data, Backbone(), store_path)
    module = Backbone()
    with torch.no_grad():
        module.head.weight[0, 0] += 1e-3
    new = _fill(data, module, store_path)
    assert new.entry_name != old.entry_name
    assert _entry_names(store_path) == {old.entry_name, new.entry_name}
    assert torch.equal(new[3][0], reference(module, data, 3))
    assert old.entry is not None and old.entry.valid_mask().all()


def test_loading_another_checkpoint_into_the_same_class_gives_a_new_entry(store_path) -> None:
    data = Samples(20)
    old = _fill(data, Backbone(seed=0), store_path)
    module = Backbone(seed=0)
    module.load_state_dict(Backbone(seed=1).state_dict())
    new = CachedFeatureDataset(data, module, store_path)
    assert new.entry_name != old.entry_name
    assert torch.equal(new[0][0], reference(module, data, 0))


def test_a_changed_buffer_gives_a_new_entry(store_path) -> None:
    data = Samples(20)
    module = Backbone()
    module.register_buffer("scale", torch.ones(1))
    old = CachedFeatureDataset(data, module, store_path)
    module.scale.fill_(2.0)
    assert CachedFeatureDataset(data, module, store_path).entry_name != old.entry_name


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda: (Samples(30, offset=0.5), {}), id="transform"),
        pytest.param(lambda: (Samples(31), {}), id="length"),
        pytest.param(lambda: (Samples(30), {"dtype": torch.float16}), id="dtype"),
        pytest.param(lambda: (Samples(30, "dict"), {"input_key": "image"}), id="structure"),
    ],
)
def test_dataset_and_option_changes_give_a_new_entry(store_path, change) -> None:
    old = _fill(Samples(30), Backbone(), store_path)
    data, options = change()
    module = Backbone()
    new = CachedFeatureDataset(data, module, store_path, **options)
    assert new.entry_name != old.entry_name
    assert old.entry_name in _entry_names(store_path)
    features = new[7][0] if not isinstance(new[7], dict) else new[7]["image"]
    expected = reference(module, data, 7)
    assert torch.equal(features, expected.to(features.dtype))


def test_input_key_is_part_of_the_entry(store_path) -> None:
    data = Samples(10, "dict")
    a = CachedFeatureDataset(data, Backbone(), store_path, input_key="image")
    b = CachedFeatureDataset(data, Backbone(), store_path, input_key=lambda s: s["image"] + 1)
    assert a.entry_name != b.entry_name


class Augmented(Samples):
    """Random noise on every load: the kind of dataset caching would freeze."""

    def image(self, index: int) -> torch.Tensor:
        return super().image(index) + random.random()


def test_random_augmentation_is_refused_with_a_clear_error(store_path) -> None:
    with pytest.raises(
        NonDeterministicDatasetError, match=r"random augmentation.*allow_nondeterministic=True"
    ):
        CachedFeatureDataset(Augmented(10), Backbone(), store_path)
    assert _entry_names(store_path) == set()


def test_random_augmentation_can_be_cached_on_purpose(store_path) -> None:
    data = Augmented(10)
    cached = CachedFeatureDataset(data, Backbone(), store_path, allow_nondeterministic=True)
    frozen = cached[2][0]
    again = CachedFeatureDataset(Augmented(10), Backbone(), store_path, allow_nondeterministic=True)
    assert again.entry_name == cached.entry_name  # the fingerprint ignores the random input
    assert torch.equal(again[2][0], frozen)


def test_versions_stand_in_for_hashing(store_path) -> None:
    data = Samples(10)
    a = CachedFeatureDataset(data, Backbone(seed=0), store_path, module_version="v1", dataset_version="d1")
    b = CachedFeatureDataset(data, Backbone(seed=5), store_path, module_version="v1", dataset_version="d1")
    c = CachedFeatureDataset(data, Backbone(seed=0), store_path, module_version="v2", dataset_version="d1")
    assert a.entry_name == b.entry_name != c.entry_name


def test_dataset_version_skips_probe_loads(store_path) -> None:
    _fill(Samples(10), Backbone(), store_path, dataset_version="d1")
    data = Samples(10)
    CachedFeatureDataset(data, Backbone(), store_path, dataset_version="d1")
    assert data.loads == 0


def test_fingerprint_descriptions_are_readable(store_path) -> None:
    cached = CachedFeatureDataset(Samples(10), Backbone(), store_path)
    assert "tests.helpers.Backbone" in cached.module_fingerprint.description
    assert "weights" in cached.module_fingerprint.description
    assert "tests.helpers.Samples of 10 samples" in cached.dataset_fingerprint.description


def _load_module(path, name: str, source: str) -> Any:
    import importlib.util

    file = path / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as a real import would, so that its source can be found
    spec.loader.exec_module(module)
    return module


def test_code_fingerprint_ignores_comments_and_docstrings_but_not_code(tmp_path) -> None:
    from cachedfeatures.compute.hashing import code_fingerprint

    base = "import torch\nclass Net(torch.nn.Module):\n    def forward(self, x):\n        return x * 2\n"
    cosmetic = (
        "import torch\nclass Net(torch.nn.Module):\n    '''Doubles.'''\n\n"
        "    def forward(self, x):  # the answer\n        return x*2\n"
    )
    changed = base.replace("x * 2", "x * 3")
    a = _load_module(tmp_path, "net_a", base).Net
    b = _load_module(tmp_path, "net_b", cosmetic).Net
    c = _load_module(tmp_path, "net_c", changed).Net
    assert code_fingerprint(a) == code_fingerprint(b)
    assert code_fingerprint(a) != code_fingerprint(c)
    # Without source (e.g. classes built by exec), the compiled methods still tell them apart.
    ns_a: dict[str, Any] = {}
    ns_c: dict[str, Any] = {}
    exec(base, ns_a)
    exec(changed, ns_c)
    assert code_fingerprint(ns_a["Net"]) != code_fingerprint(ns_c["Net"])


_SCRIPT = """
import json
import sys

import torch
from torch import nn

from cachedfeatures import CachedFeatureDataset


class Model(nn.Module):
    __cachedfeatures_exclude__ = ("calls",)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return FORWARD


class Data(torch.utils.data.Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, index):
        return torch.full((4,), float(index)), index % 3


def run(store):
    model = Model().eval()
    cached = CachedFeatureDataset(Data(), model, store, batch_size=8, spot_check=0)
    for _batch in cached.loader(batch_size=8):
        pass
    return {"entry": cached.entry_name, "calls": model.calls, "class": cached.entry.meta["module"]["class"]}


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1])))
"""


def _run_in(directory: Path, *args: str) -> dict[str, Any]:
    """``python *args`` in ``directory`` (the repository on the path); the last line is JSON."""
    result = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        cwd=directory,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _script(directory: Path, forward: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "script.py").write_text(_SCRIPT.replace("FORWARD", forward))
    return directory


@pytest.mark.slow
def test_a_class_run_as_a_script_and_later_imported_reuses_the_entry(
    store_path: Path, tmp_path: Path
) -> None:
    """``python script.py`` and then ``import script``: one entry, no module call the second time."""
    directory = _script(tmp_path / "project", "self.linear(x) * 2")
    first = _run_in(directory, "script.py", str(store_path))
    assert first["calls"] > 0 and first["class"] == "script.Model"  # named as its module, not __main__
    again = _run_in(
        directory,
        "-c",
        "import json, sys, script; print(json.dumps(script.run(sys.argv[1])))",
        str(store_path),
    )
    assert again["entry"] == first["entry"]
    assert again["calls"] == 0
    as_module = _run_in(directory, "-m", "script", str(store_path))  # named by __spec__
    assert as_module["entry"] == first["entry"] and as_module["calls"] == 0


@pytest.mark.slow
def test_two_scripts_with_a_class_of_the_same_name_keep_apart(store_path: Path, tmp_path: Path) -> None:
    """Both are ``script.Model`` once named by their file; their code still tells them apart."""
    doubled = _run_in(_script(tmp_path / "a", "self.linear(x) * 2"), "script.py", str(store_path))
    shifted = _run_in(_script(tmp_path / "b", "self.linear(x) + 1"), "script.py", str(store_path))
    assert doubled["class"] == shifted["class"] == "script.Model"
    assert doubled["entry"] != shifted["entry"]
    assert shifted["calls"] > 0


_SPAWNING = """
import json
import multiprocessing

from torch import nn

from cachedfeatures.compute.fingerprint import module_fingerprint


class Model(nn.Module):
    def forward(self, x):
        return x * 2


def fingerprint():
    return module_fingerprint(Model().eval()).to_json()


if __name__ == "__main__":
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        child = pool.apply(fingerprint)
    print(json.dumps({"parent": fingerprint(), "child": child}))
"""


@pytest.mark.slow
def test_a_spawned_worker_names_the_script_s_classes_as_its_parent_does(tmp_path: Path) -> None:
    """A spawned process runs the script as ``__mp_main__``: still ``script.Model``, one entry."""
    (tmp_path / "script.py").write_text(_SPAWNING)
    result = _run_in(tmp_path, "script.py")
    assert result["child"]["class"] == result["parent"]["class"] == "script.Model"
    assert result["child"]["digest"] == result["parent"]["digest"]
