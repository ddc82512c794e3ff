"""When the first sample cannot go through the module, the error names the sample, the field,
its type and the fix: a PIL image (add ToTensor()), a label as the input (input_key), a Hugging
Face dataset without with_format("torch"), a string without a tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from cachedfeatures import CachedFeatureDataset, FieldNotStorableError, InputTypeError
from tests.helpers import Backbone, Listed, Samples

Image = pytest.importorskip("PIL.Image")


class PILImages(Dataset[Any]):
    """(image, label) pairs whose image is a PIL image made on load, as ImageFolder's are."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, index: int) -> Any:
        return Image.fromarray(np.full((8, 8, 3), index, dtype=np.uint8)), index % 3


def test_pil_image_input_says_add_to_tensor(store_path) -> None:
    with pytest.raises(
        InputTypeError,
        match=r"sample 0's input sample\[0\] is a PIL\.Image\.Image \(RGB, size \(8, 8\)\)\. .*ToTensor\(\)",
    ) as info:
        CachedFeatureDataset(PILImages(), Backbone(), store_path)
    assert isinstance(info.value, TypeError)  # also the built-in
    assert isinstance(info.value.__cause__, TypeError)  # default_collate's own error, chained


def test_label_as_the_input_says_input_key_points_at_the_label(store_path) -> None:
    with pytest.raises(
        InputTypeError,
        match=r"sample 0's input sample\[1\] is an int \(0\)\. input_key=1 probably points at the label.*"
        r"pass input_key=0",
    ):
        CachedFeatureDataset(Samples(6, "tuple"), Backbone(), store_path, input_key=1)
    with pytest.raises(
        InputTypeError, match=r"input_key='label' probably points at the label.*input_key='image'"
    ):
        CachedFeatureDataset(Samples(6, "dict"), Backbone(), store_path, input_key="label")
    # The image a PIL image too: the field that cannot be stored is not the first thing said.
    with pytest.raises(InputTypeError, match=r"input_key=1 probably points at the label.*pass input_key=0"):
        CachedFeatureDataset(PILImages(), Backbone(), store_path, input_key=1)


def test_hugging_face_dataset_without_torch_format(store_path) -> None:
    datasets = pytest.importorskip("datasets")
    images = [np.random.default_rng(i).random((3, 8, 8), dtype=np.float32) for i in range(6)]
    table = datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(6)]})
    with pytest.raises(
        InputTypeError,
        match=r"sample 0's input sample\['image'\] is a list of 3 items.*with_format\('torch'\)",
    ):
        CachedFeatureDataset(table, Backbone(), store_path, input_key="image")
    cached = CachedFeatureDataset(table.with_format("torch"), Backbone(), store_path, input_key="image")
    assert cached[2]["image"].shape == (16,) and int(cached[2]["label"]) == 2


def test_hugging_face_image_column_without_torch_format(store_path) -> None:
    datasets = pytest.importorskip("datasets")
    pictures = [Image.fromarray(np.full((8, 8, 3), i, dtype=np.uint8)) for i in range(4)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    table = datasets.Dataset.from_dict({"image": pictures, "label": [0, 1, 0, 1]}, features=features)
    with pytest.raises(InputTypeError, match=r"is a PIL\..*with_format\('torch'\)"):
        CachedFeatureDataset(
            torch.utils.data.Subset(table, range(4)), Backbone(), store_path, input_key="image"
        )


def test_text_without_a_tokenizer_says_pass_collate_fn(store_path) -> None:
    with pytest.raises(
        InputTypeError, match=r"input \(the sample itself\) is a str \('a short sentence'\)\. Text"
    ):
        CachedFeatureDataset(Listed(["a short sentence", "another"]), Backbone(), store_path)


class Fails(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("boom")


def test_other_failures_keep_their_type_and_name_the_sample(store_path) -> None:
    with pytest.raises(ValueError, match="boom") as info:
        CachedFeatureDataset(Samples(6, "dict"), Fails().eval(), store_path, input_key="image")
    assert not isinstance(info.value, InputTypeError)
    note = "\n".join(getattr(info.value, "__notes__", []))
    assert "sample 0" in note and "sample['image'] is a Tensor of shape (3, 8, 8)" in note


def test_a_field_that_cannot_be_stored_is_named_not_blamed_on_the_input(tmp_path: Path) -> None:
    """Found by the property tests: a 0-d int input beside a field of None was reported as
    "input_key probably points at the label"; the field is what cannot be stored."""
    data = [(torch.tensor(3, dtype=torch.int8), None)] * 4
    with pytest.raises(FieldNotStorableError, match=r"sample\[1\] is a NoneType"):
        CachedFeatureDataset(data, nn.Identity(), tmp_path / "f.zarr", spot_check=0)
    with_array = [(torch.tensor(3, dtype=torch.int8), None, np.zeros(0, dtype=np.int8))] * 4
    with pytest.raises(FieldNotStorableError, match=r"sample\[1\] is a NoneType"):
        CachedFeatureDataset(with_array, nn.Identity(), tmp_path / "g.zarr", spot_check=0)
