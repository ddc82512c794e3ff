"""Bad input gets a clear error that says what to do, and nothing cached is lost."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from cachedfeatures import (
    CachedFeatureDataset,
    CacheError,
    FieldNotStorableError,
    InputKeyError,
    ModuleOutputError,
    NotAFeatureStoreError,
    OutputShapeError,
    StorePathError,
    TrainingModeError,
)
from tests.helpers import Backbone, Samples, reference


def test_missing_input_key_names_the_keys(store_path) -> None:
    with pytest.raises(
        InputKeyError, match=r"'img' not in sample keys \['image', 'label', 'name'\]; pass input_key='image'"
    ):
        CachedFeatureDataset(Samples(5, "dict"), Backbone(), store_path, input_key="img")
    with pytest.raises(InputKeyError, match="pass an int from 0 to 1"):
        CachedFeatureDataset(Samples(5, "tuple"), Backbone(), store_path, input_key=3)
    with pytest.raises(KeyError):  # also catchable as the built-in
        CachedFeatureDataset(Samples(5, "dict"), Backbone(), store_path, input_key="img")


class ReturnsList(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> Any:
        return [x.tolist()]


def test_module_returning_a_non_tensor(store_path) -> None:
    with pytest.raises(ModuleOutputError, match="must return a tensor, or a tuple or dict"):
        CachedFeatureDataset(Samples(5), ReturnsList().eval(), store_path)


class ShapeShifter(torch.nn.Module):
    """Returns 4 features per row for batches of one, 6 otherwise."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_next = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = 4 if len(x) == 1 else 6
        return x.flatten(1)[:, :width]


def test_output_shape_changing_between_batches(store_path) -> None:
    data = Samples(20)
    cached = CachedFeatureDataset(data, ShapeShifter().eval(), store_path, batch_size=4)
    cached.__getitems__([5])  # batch of one: the stored shape, fine
    assert cached.entry is not None
    before = cached.entry.valid_mask().copy()
    with pytest.raises(OutputShapeError, match=r"per-row shape \(6,\).*stores shape \(4,\)"):
        cached.__getitems__([1, 2, 3])
    assert np.array_equal(cached.entry.valid_mask(), before)
    assert torch.equal(cached[5][0], data.image(5).flatten()[:4])


class Exploding(Backbone):
    def __init__(self) -> None:
        super().__init__()
        self.explode = False

    def forward(self, x: torch.Tensor) -> Any:
        if self.explode:
            raise RuntimeError("boom")
        return super().forward(x)


def test_forward_that_raises_marks_nothing_from_its_batch_valid(store_path) -> None:
    data = Samples(40)
    module = Exploding()
    cached = CachedFeatureDataset(data, module, store_path, batch_size=8)
    cached.__getitems__(list(range(8, 16)))
    module.explode = True
    with pytest.raises(RuntimeError, match="boom") as info:
        cached.__getitems__(list(range(16, 24)))
    assert any("nothing from this batch was stored" in note for note in info.value.__notes__)
    assert cached.entry is not None
    valid = cached.entry.valid_mask()
    assert valid[8:16].all() and not valid[16:24].any()
    module.explode = False
    assert torch.equal(cached[10][0], reference(module, data, 10))
    assert torch.equal(cached[20][0], reference(module, data, 20))


def test_store_path_that_is_a_file(tmp_path) -> None:
    path = tmp_path / "features.zarr"
    path.write_text("not a store")
    with pytest.raises(StorePathError, match="is a file; pass a directory path"):
        CachedFeatureDataset(Samples(5), Backbone(), path)
    assert path.read_text() == "not a store"


def test_store_path_that_is_another_directory(tmp_path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(StorePathError, match="not a Zarr store; pass a new path"):
        CachedFeatureDataset(Samples(5), Backbone(), tmp_path / "photos")
    assert (tmp_path / "photos" / "cat.jpg").read_bytes() == b"\xff\xd8"


def test_someone_elses_zarr_store(tmp_path) -> None:
    import zarr

    root = zarr.open_group(tmp_path / "other.zarr", mode="w")
    root.create_array("x", shape=(3,), dtype="int8")
    with pytest.raises(NotAFeatureStoreError, match="did not write"):
        CachedFeatureDataset(Samples(5), Backbone(), tmp_path / "other.zarr")


def test_index_out_of_range(store_path) -> None:
    cached = CachedFeatureDataset(Samples(5), Backbone(), store_path)
    with pytest.raises(IndexError, match="index 5 is out of range for a dataset of 5 samples"):
        cached[5]
    with pytest.raises(IndexError):
        cached.__getitems__([0, -6])
    with pytest.raises(TypeError, match="indices must be integers"):
        cached[1.5]  # type: ignore[index]


def test_module_with_dropout_in_training_mode(store_path) -> None:
    module = torch.nn.Sequential(Backbone(), torch.nn.Dropout(0.1)).train()
    with pytest.raises(TrainingModeError, match=r"1 \(dropout p=0.1\).*module.eval\(\)"):
        CachedFeatureDataset(Samples(5), module, store_path)


class WithObject(Samples):
    def __getitem__(self, index: int) -> Any:
        image, label = super().__getitem__(index)
        return {"image": image, "label": label, "meta": object()}


class WithRaggedField(Samples):
    def __getitem__(self, index: int) -> Any:
        image, _ = super().__getitem__(index)
        # Only the first dimension may vary (a ragged field); here the second one does.
        return {"image": image, "boxes": torch.zeros(4, index % 3)}


def test_unstorable_field_names_the_field_and_the_fix(store_path) -> None:
    with pytest.raises(
        FieldNotStorableError, match=r"sample\['meta'\] is a object.*Convert it in the dataset"
    ):
        CachedFeatureDataset(WithObject(5), Backbone(), store_path, input_key="image")


def test_field_changing_shape_between_samples(store_path) -> None:
    data = WithRaggedField(9)
    cached = CachedFeatureDataset(data, Backbone(), store_path, input_key="image", batch_size=9)
    with pytest.raises(OutputShapeError, match="field 'boxes'"):
        cached.__getitems__(list(range(9)))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"batch_size": 0}, "Expected batch_size to be a positive int. Got 0."),
        ({"device": "gpu7"}, "Expected device to be like 'cpu'"),
        ({"dtype": "float16"}, "Expected dtype to be a torch.dtype"),
        ({"input_key": 1.5}, "Expected input_key to be an int index"),
        ({"chunk_rows": -1}, "Expected chunk_rows to be a positive int"),
    ],
)
def test_bad_arguments(store_path, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        CachedFeatureDataset(Samples(5), Backbone(), store_path, **kwargs)


def test_all_errors_share_the_base_class() -> None:
    import cachedfeatures.errors as errors

    for name in errors.__all__:
        kind = getattr(errors, name)
        assert issubclass(kind, errors.CacheWarning if issubclass(kind, Warning) else CacheError)
