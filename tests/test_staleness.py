"""Never stale: each way a first run could leave features that a second run would wrongly serve.

Each case is a small user project written to a temporary directory (``user.py``). A first
process builds the dataset and module from it and fills a store; the project is then edited as
a user would edit it (a constant, a closure, a plain tensor attribute, a helper in another file,
a base class, a config object, the data); a second process on the same store must serve its own
features, equal to the module's direct outputs, from a new entry, and leave the old entry alone.
A third run of the first version must find the first entry again: fingerprints are stable
across processes, so the cache is reused when nothing changed.
"""

from __future__ import annotations

import random
import textwrap
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from cachedfeatures import (
    CachedFeatureDataset,
    FeatureStore,
    FingerprintWarning,
    NonDeterministicDatasetError,
)
from tests.helpers import Backbone, Samples, run_script

pytestmark = pytest.mark.slow  # most cases run three fresh processes

# Builds user.build() -> (dataset, module, options, expected) and reports what was served.
RUNNER = """
import json, sys
sys.dont_write_bytecode = True  # the project is edited between runs, sometimes within a second
sys.path.insert(0, sys.argv[1])
import torch
from cachedfeatures import CachedFeatureDataset
import user

dataset, module, options, expected = user.build()
cached = CachedFeatureDataset(dataset, module, sys.argv[2], batch_size=16, **options)
rows = list(range(len(dataset)))
served = cached.__getitems__(rows)
worst = 0.0
for i, sample in zip(rows, served):
    features = sample[0] if isinstance(sample, (tuple, list)) else sample
    want = expected(i)
    worst = max(worst, float((features.float() - want.float()).abs().max()))
labels = [int(s[1]) for s in served] if isinstance(served[0], (tuple, list)) else []
print(json.dumps({"entry": cached.entry_name, "worst": worst, "labels": labels}))
"""

# Shared by the projects: deterministic images and a tokenizer-like collate over them.
COMMON = """
import functools
import torch
from torch import nn
from torch.utils.data import Dataset


class Images(Dataset):
    def __init__(self, n=40):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.randn(12, generator=torch.Generator().manual_seed(i)), i % 7


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(12, 6)
        generator = torch.Generator().manual_seed(0)
        torch.nn.init.normal_(self.linear.weight, generator=generator)
        torch.nn.init.normal_(self.linear.bias, generator=generator)

    def forward(self, x):
        return self.linear(x)
"""


TOLERANCE = 1e-4


def _run(project: Path, store: Path, source: str) -> dict[str, Any]:
    (project / "user.py").write_text(textwrap.dedent(COMMON) + textwrap.dedent(source))
    return run_script(RUNNER, str(project), str(store))


def _first_then_second(tmp_path: Path, first: str, second: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run ``first``, then ``second`` on one store; check the second serves its own features."""
    project, store = tmp_path / "project", tmp_path / "features.zarr"
    project.mkdir(exist_ok=True)
    a = _run(project, store, first)
    b = _run(project, store, second)
    # Rows are computed in batches of 16 and compared with a batch of one: BLAS may differ in
    # the last bits. A stale row is off by far more.
    assert a["worst"] <= TOLERANCE
    assert b["entry"] != a["entry"], "the edit was not seen: the second run reused the first entry"
    assert b["worst"] <= TOLERANCE, f"the second run served features off by {b['worst']}"
    assert {e.name for e in FeatureStore.open(store).entries} >= {a["entry"], b["entry"]}
    again = _run(project, store, first)
    assert again["entry"] == a["entry"], "the fingerprint is not stable across processes"
    return a, b


# -- options: collate_fn and input_key ----------------------------------------------------------

COLLATE_GLOBAL = """
MAXLEN = {value}

def collate(batch):
    return torch.stack(batch)[:, :MAXLEN].sum(1, keepdim=True).expand(-1, 12).contiguous()

def build():
    data, module = Images(), Encoder().eval()
    expected = lambda i: module(collate([data[i][0]]))[0].detach()
    return data, module, {{"collate_fn": collate}}, expected
"""


def test_a_module_level_constant_read_by_collate_fn(tmp_path) -> None:
    _first_then_second(tmp_path, COLLATE_GLOBAL.format(value=12), COLLATE_GLOBAL.format(value=3))


COLLATE_PARTIAL = """
def tokenize(batch, max_length):
    return torch.stack(batch)[:, :max_length].sum(1, keepdim=True).expand(-1, 12).contiguous()

def build():
    data, module = Images(), Encoder().eval()
    collate = functools.partial(tokenize, max_length={value})
    expected = lambda i: module(collate([data[i][0]]))[0].detach()
    return data, module, {{"collate_fn": collate}}, expected
"""


def test_a_partial_collate_fn_with_another_keyword(tmp_path) -> None:
    _first_then_second(tmp_path, COLLATE_PARTIAL.format(value=12), COLLATE_PARTIAL.format(value=8))


COLLATE_CLOSURE = """
def make_collate(scale):
    def collate(batch):
        return torch.stack(batch) * scale
    return collate

def build():
    data, module = Images(), Encoder().eval()
    collate = make_collate({value})
    expected = lambda i: module(collate([data[i][0]]))[0].detach()
    return data, module, {{"collate_fn": collate}}, expected
"""


def test_a_closure_variable_of_collate_fn(tmp_path) -> None:
    _first_then_second(tmp_path, COLLATE_CLOSURE.format(value=1.0), COLLATE_CLOSURE.format(value=2.0))


TWO_LAMBDAS = """
KEYS = {{"plain": lambda s: s[0], "scaled": lambda s: s[0] * 3}}

def build():
    data, module = Images(), Encoder().eval()
    key = KEYS["{value}"]
    expected = lambda i: module(key(data[i])[None])[0].detach()
    return data, module, {{"input_key": key}}, expected
"""


def test_two_lambdas_of_one_statement_as_input_key(tmp_path) -> None:
    _first_then_second(tmp_path, TWO_LAMBDAS.format(value="plain"), TWO_LAMBDAS.format(value="scaled"))


# -- the module's state beyond parameters and buffers --------------------------------------------

PLAIN_TENSOR = """
class Projected(nn.Module):
    def __init__(self, value):
        super().__init__()
        self.proj = torch.full((12, 5), value)  # a plain attribute: no parameter, no buffer

    def forward(self, x):
        return x @ self.proj

def build():
    data, module = Images(), Projected({value}).eval()
    return data, module, {{}}, lambda i: module(data[i][0][None])[0]
"""


def test_a_plain_tensor_attribute_of_the_module(tmp_path) -> None:
    _first_then_second(tmp_path, PLAIN_TENSOR.format(value=1.0), PLAIN_TENSOR.format(value=0.5))


PYTHON_FLOAT = """
class Tempered(Encoder):
    def __init__(self, temperature):
        super().__init__()
        self.temperature = temperature

    def forward(self, x):
        return super().forward(x) / self.temperature

def build():
    data, module = Images(), Tempered({value}).eval()
    return data, module, {{}}, lambda i: module(data[i][0][None])[0].detach()
"""


def test_a_python_float_set_in_init(tmp_path) -> None:
    _first_then_second(tmp_path, PYTHON_FLOAT.format(value=1.0), PYTHON_FLOAT.format(value=0.07))


BOUND_METHOD = """
class Clip(nn.Module):
    def __init__(self, seed):
        super().__init__()
        self.visual = nn.Linear(12, 6)
        generator = torch.Generator().manual_seed(seed)
        torch.nn.init.normal_(self.visual.weight, generator=generator)
        torch.nn.init.normal_(self.visual.bias, generator=generator)

    def encode_image(self, x):
        return self.visual(x)

def build():
    data, clip = Images(), Clip({value}).eval()
    return data, clip.encode_image, {{}}, lambda i: clip.encode_image(data[i][0][None])[0].detach()
"""


def test_new_weights_behind_a_bound_method(tmp_path) -> None:
    _first_then_second(tmp_path, BOUND_METHOD.format(value=0), BOUND_METHOD.format(value=1))


def test_a_helper_function_in_another_file(tmp_path) -> None:
    source = """
from helpers_lib import postprocess

class WithHelper(Encoder):
    def forward(self, x):
        return postprocess(super().forward(x))

def build():
    data, module = Images(), WithHelper().eval()
    return data, module, {}, lambda i: module(data[i][0][None])[0].detach()
"""
    project = tmp_path / "project"
    project.mkdir()
    (project / "helpers_lib.py").write_text("def postprocess(x):\n    return x * 2\n")
    store = tmp_path / "features.zarr"
    a = _run(project, store, source)
    (project / "helpers_lib.py").write_text("def postprocess(x):\n    return x.tanh()\n")
    b = _run(project, store, source)
    assert b["entry"] != a["entry"] and b["worst"] <= TOLERANCE


def test_a_custom_base_class_forward_in_another_file(tmp_path) -> None:
    source = """
from base_lib import Base

class Net(Base):
    pass

def build():
    data, module = Images(), Net().eval()
    return data, module, {}, lambda i: module(data[i][0][None])[0].detach()
"""
    project = tmp_path / "project"
    project.mkdir()
    base = "import torch\nclass Base(torch.nn.Module):\n    def forward(self, x):\n        return {}\n"
    (project / "base_lib.py").write_text(base.format("x[:, :6] * 2"))
    store = tmp_path / "features.zarr"
    a = _run(project, store, source)
    (project / "base_lib.py").write_text(base.format("x[:, 6:] * 2"))
    b = _run(project, store, source)
    assert b["entry"] != a["entry"] and b["worst"] <= TOLERANCE


CONFIG_OBJECT = """
class Config:
    def __init__(self):
        self.scale = {value}

CONFIG = Config()

class Configured(Encoder):
    def forward(self, x):
        return super().forward(x) * CONFIG.scale

def build():
    data, module = Images(), Configured().eval()
    return data, module, {{}}, lambda i: module(data[i][0][None])[0].detach()
"""


def test_a_global_config_object_the_module_reads(tmp_path) -> None:
    _first_then_second(tmp_path, CONFIG_OBJECT.format(value=1.0), CONFIG_OBJECT.format(value=3.0))


def test_a_changed_submodule_class_is_a_new_entry(tmp_path) -> None:
    source = """
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder, self.act = Encoder(), nn.{value}()

    def forward(self, x):
        return self.act(self.encoder(x))

def build():
    data, module = Images(), Net().eval()
    return data, module, {{}}, lambda i: module(data[i][0][None])[0].detach()
"""
    _first_then_second(tmp_path, source.format(value="ReLU"), source.format(value="Tanh"))


# -- the dataset beyond its probes ---------------------------------------------------------------

DATA_ARRAY = """
import numpy as np

class Table(Dataset):
    def __init__(self, changed):
        rng = np.random.default_rng(0)
        self.values = rng.standard_normal((1000, 12)).astype("float32")
        if changed:  # 300 rows outside the probes
            self.values[100:400] += 1.0

    def __len__(self):
        return len(self.values)

    def __getitem__(self, i):
        return torch.from_numpy(self.values[i]), i % 7

def build():
    data, module = Table({value}), Encoder().eval()
    return data, module, {{}}, lambda i: module(data[i][0][None])[0].detach()
"""


@pytest.mark.slow
def test_rows_changed_outside_the_probes(tmp_path) -> None:
    _first_then_second(tmp_path, DATA_ARRAY.format(value=False), DATA_ARRAY.format(value=True))


LABEL_MAP = """
class Relabelled(Images):
    def __init__(self, label_map):
        super().__init__(2000)
        self.label_map = label_map

    def __getitem__(self, i):
        image, _ = super().__getitem__(i)
        return image, self.label_map.get(i % 10, i % 10)

def build():
    data, module = Relabelled({value}), Encoder().eval()
    return data, module, {{}}, lambda i: module(data[i][0][None])[0].detach()
"""


def test_a_swapped_label_map(tmp_path) -> None:
    """No probe sample has label 3 or 5 (2,000 samples, labels i % 10): only the state shows it."""
    a, b = _first_then_second(tmp_path, LABEL_MAP.format(value={}), LABEL_MAP.format(value={3: 5, 5: 3}))
    assert b["labels"] == [{3: 5, 5: 3}.get(i % 10, i % 10) for i in range(2000)]
    assert a["labels"] == [i % 10 for i in range(2000)]


def test_a_file_of_a_file_list_rewritten(tmp_path) -> None:
    files = tmp_path / "files"
    files.mkdir()
    for i in range(30):
        np.save(files / f"{i}.npy", np.full(12, i, dtype=np.float32))
    source = f"""
import os
import numpy as np

class Files(Dataset):
    def __init__(self):
        self.paths = sorted(os.path.join({str(files)!r}, f) for f in os.listdir({str(files)!r}))

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return torch.from_numpy(np.load(self.paths[i])), i % 7

def build():
    data, module = Files(), Encoder().eval()
    return data, module, {{}}, lambda i: module(data[i][0][None])[0].detach()
"""
    project, store = tmp_path / "project", tmp_path / "features.zarr"
    project.mkdir()
    a = _run(project, store, source)
    np.save(files / "13.npy", np.full(24, -1, dtype=np.float32)[:12])  # same shape, other values
    b = _run(project, store, source)
    assert b["entry"] != a["entry"] and b["worst"] <= TOLERANCE


class InMemory(Samples):
    """A dataset whose samples live in a tensor and whose loader is a function attribute."""

    def __init__(self, n: int, transform: Any = None) -> None:
        super().__init__(n)
        self.values = torch.stack([super(InMemory, self).image(i) for i in range(n)])
        self.transform = transform or _identity

    def image(self, index: int) -> torch.Tensor:
        return self.transform(self.values[index])


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _negate(x: torch.Tensor) -> torch.Tensor:
    return -x


def test_tensor_state_and_function_attributes_of_the_dataset(store_path) -> None:
    base = CachedFeatureDataset(InMemory(300), Backbone(), store_path)
    changed = InMemory(300)
    changed.values[101] += 1.0  # not a probe
    assert 101 not in base.dataset_fingerprint.details["probes"]
    assert CachedFeatureDataset(changed, Backbone(), store_path).entry_name != base.entry_name
    other = CachedFeatureDataset(InMemory(300, _negate), Backbone(), store_path)
    assert other.entry_name != base.entry_name
    assert CachedFeatureDataset(InMemory(300), Backbone(), store_path).entry_name == base.entry_name


# -- augmentation ----------------------------------------------------------------------------------


class Flipped(Samples):
    """``RandomHorizontalFlip(p=0.5)`` as torchvision draws it: one ``torch.rand(1)`` per load."""

    def __init__(self, n: int, generator: str = "torch") -> None:
        super().__init__(n)
        self.generator = generator

    def image(self, index: int) -> torch.Tensor:
        image = super().image(index)
        draw = {
            "torch": lambda: float(torch.rand(1)),
            "numpy": lambda: float(np.random.rand()),
            "python": random.random,
        }[self.generator]()
        return image.flip(-1) if draw < 0.5 else image


@pytest.mark.parametrize("generator", ["torch", "numpy", "python"])
def test_a_coin_flip_augmentation_is_caught_under_every_seed(store_path, generator) -> None:
    for seed in range(20):
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        with pytest.raises(NonDeterministicDatasetError, match="random augmentation"):
            CachedFeatureDataset(Flipped(50, generator), Backbone(), store_path)
    assert FeatureStore.open(store_path).entries == []


def test_probing_leaves_the_callers_random_streams_alone(store_path) -> None:
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    expected = (torch.rand(1), np.random.rand(), random.random())
    module = Backbone()  # its initialisation draws from torch's generator
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    CachedFeatureDataset(Samples(50), module, store_path)
    assert (torch.rand(1), np.random.rand(), random.random()) == expected


def test_a_dataset_counter_does_not_change_the_entry(store_path) -> None:
    """``Samples.loads`` counts loads: state that changes by reading is not configuration."""
    data = Samples(30)
    first = CachedFeatureDataset(data, Backbone(), store_path)
    assert data.loads > 0
    second = CachedFeatureDataset(data, Backbone(), store_path)  # the counter has moved on
    assert second.entry_name == first.entry_name
    assert "loads" in first.dataset_fingerprint.details["volatile_attributes"]
    assert "offset" in first.dataset_fingerprint.details["state_attributes"]


# -- training mode, judged by behaviour --------------------------------------------------------------


class Wrapper(nn.Module):
    """A deterministic head around a backbone with dropout, like ``self.bert = AutoModel...``."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(Backbone(), nn.Dropout(0.1), nn.BatchNorm1d(16))
        self.pool = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.backbone(x))


def test_a_wrapper_in_training_mode_around_an_eval_backbone_is_accepted(store_path) -> None:
    module = Wrapper().train()
    module.backbone.eval()
    cached = CachedFeatureDataset(Samples(10), module, store_path)
    with torch.inference_mode():
        assert torch.equal(cached[4][0], module(Samples(10)[4][0][None])[0])


def test_a_bare_linear_in_training_mode_is_accepted(store_path) -> None:
    data = [torch.randn(8) for _ in range(5)]
    CachedFeatureDataset(data, nn.Linear(8, 3).train(), store_path)


def test_the_training_mode_error_names_what_depends_on_the_mode(store_path) -> None:
    from cachedfeatures import TrainingModeError

    class ReadsTraining(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * (2 if self.training else 1)

    with pytest.raises(TrainingModeError, match=r"backbone.1 \(dropout p=0.1\), backbone.2 \(batch norm"):
        CachedFeatureDataset(Samples(10), Wrapper().train(), store_path)
    with pytest.raises(TrainingModeError, match=r"reads self.training"):
        CachedFeatureDataset([torch.randn(8) for _ in range(5)], ReadsTraining().train(), store_path)


# -- what fingerprints cannot see is said ----------------------------------------------------------


class HoldsALock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        import threading

        self.lock = threading.Lock()  # by its type: a lock changes no value
        self.rows = (i for i in range(3))  # a generator: no __dict__, does not pickle

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def test_state_that_cannot_be_hashed_is_named_in_a_warning(store_path) -> None:
    with pytest.warns(
        FingerprintWarning,
        match=r"cannot see into HoldsALock.rows \(builtins.generator\) of.*module_version=",
    ):
        CachedFeatureDataset(Samples(10), HoldsALock(), store_path)


class Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += len(x)
        return x.flatten(1)


class CountingExcluded(Counting):
    __cachedfeatures_exclude__ = ("seen",)


def test_attributes_a_forward_changes_are_named_and_can_be_excluded(store_path) -> None:
    with pytest.warns(FingerprintWarning, match=r"changed its attributes seen.*\('seen',\)"):
        CachedFeatureDataset(Samples(10), Counting(), store_path)
    module = CountingExcluded()
    first = CachedFeatureDataset(Samples(10), module, store_path)
    first.__getitems__(list(range(10)))
    assert module.seen > 0
    assert CachedFeatureDataset(Samples(10), module, store_path).entry_name == first.entry_name


# -- stable across processes, blind to what changes no value -----------------------------------------

STABILITY = """
import dataclasses, json, logging, sys
import torch
from torch import nn
from cachedfeatures.compute.fingerprint import module_fingerprint
from cachedfeatures.compute import hashing as _hashing

log = logging.getLogger("user.model")

class Logs(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.log = logging.getLogger("user.attr")

    def forward(self, x):
        log.debug("forward")
        return self.linear(x)

class Seeded(nn.Module):
    def __init__(self):
        super().__init__()
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, x):
        return x

@dataclasses.dataclass
class Sample:
    image: torch.Tensor
    tags: set

torch.manual_seed(0)
digests = {
    "compiled": module_fingerprint(torch.compile(nn.Linear(4, 4))).digest,
    "logger": module_fingerprint(Logs()).digest,
    "generator": module_fingerprint(Seeded()).digest,
    "sample": _hashing.hash_value(Sample(torch.arange(6.0), {"a", "b", "c", "d"})),
    "dict_from_set": _hashing.hash_value({k: 1 for k in {"x", "y", "z", "w"}}),
}
print(json.dumps(digests))
"""


def test_fingerprints_agree_across_processes_and_hash_seeds(tmp_path) -> None:
    import os

    runs = []
    for seed in ("1", "2"):
        os.environ["PYTHONHASHSEED"] = seed
        try:
            runs.append(run_script(STABILITY))
        finally:
            del os.environ["PYTHONHASHSEED"]
    assert runs[0] == runs[1]


def test_a_compiled_module_is_fingerprinted_as_what_it_compiles() -> None:
    from cachedfeatures.compute.fingerprint import module_fingerprint

    torch.manual_seed(0)
    plain = nn.Linear(4, 4)
    with warnings.catch_warnings():  # importing the compiler stack warns about torch.jit in torch
        warnings.simplefilter("ignore", DeprecationWarning)
        compiled = torch.compile(plain)
    assert module_fingerprint(compiled).digest == module_fingerprint(plain).digest


class Settings:
    def __init__(self, lr: float) -> None:
        self.lr, self.hidden = lr, 4


SETTINGS = Settings(0.1)  # a training script's config: `self.settings.hidden` below is an attribute


class ReadsAnAttributeNamedLikeAGlobal(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.settings = Settings(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, : self.settings.hidden]


def test_an_attribute_named_like_a_global_does_not_pull_the_global_in() -> None:
    from cachedfeatures.compute.fingerprint import module_fingerprint

    module = ReadsAnAttributeNamedLikeAGlobal()
    before = module_fingerprint(module).digest
    SETTINGS.lr = 0.01  # the global's learning rate: no value of the module depends on it
    try:
        assert module_fingerprint(module).digest == before
    finally:
        SETTINGS.lr = 0.1


def test_odd_objects_are_hashed_or_reported_never_a_crash() -> None:
    from cachedfeatures.compute.state_hash import StateHasher

    class Raising:
        def __getattr__(self, name: str) -> Any:
            raise KeyError(name)

    deep: list[Any] = []
    for _ in range(5000):
        deep = [deep]
    hasher = StateHasher()
    for value in (nn.LazyLinear(3), Raising(), deep, torch.empty(2, device="meta")):
        hasher.update(value, "value")
    assert any("nested more than" in what for what in hasher.unhashed)


def test_paths_and_directories(tmp_path) -> None:

    from cachedfeatures.compute.state_hash import StateHasher

    def digest(value: Any) -> str:
        hasher = StateHasher(stat_files=True)
        hasher.update(value)
        return hasher.hexdigest()

    (tmp_path / "a.npy").write_bytes(b"1")
    assert digest(str(tmp_path / "a.npy")) == digest(tmp_path / "a.npy")
    root = digest(str(tmp_path))
    (tmp_path / "train.log").write_text("a new file in the data directory")
    assert digest(str(tmp_path)) == root  # a directory counts by name, not by its mtime
    before = digest([tmp_path / "a.npy"] * 100)
    (tmp_path / "a.npy").write_bytes(b"22")
    assert digest([tmp_path / "a.npy"] * 100) != before
