"""Call conventions (``call=``), output selection (``output=``) and moving Mapping batches to
the device: a tokenizer-style dict batch reaches a keyword ``forward`` without a wrapper."""

from __future__ import annotations

import collections
from collections import UserDict
from typing import Any, NamedTuple

import pytest
import torch
from torch import nn

from cachedfeatures import CachedFeatureDataset, CallConventionError, ModuleOutputError
from tests.helpers import Listed


def token_samples(n: int = 24, length: int = 6) -> Listed:
    """Samples like a tokenized text dataset: a dict of ids and a mask, and a label."""
    samples = []
    for i in range(n):
        ids = (torch.arange(length) * (i + 1)) % 50
        mask = (torch.arange(length) < 1 + i % length).long()
        samples.append({"tokens": {"input_ids": ids, "attention_mask": mask}, "label": i % 3})
    return Listed(samples)


def collate_encoding(inputs: list[dict[str, torch.Tensor]]) -> UserDict[str, Any]:
    """A collate that returns a UserDict (as a tokenizer's BatchEncoding is), not a dict."""
    return UserDict({key: torch.stack([item[key] for item in inputs]) for key in inputs[0]})


class Output(collections.OrderedDict[str, Any]):
    """Like transformers' ModelOutput: a dict whose keys are also attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class KeywordEncoder(nn.Module):
    """A forward with keyword parameters, like a transformers model; it returns an output that
    also holds a non-tensor (as a SentenceTransformer's features dict does)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 4)
        self.eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Output:
        hidden = self.embed(input_ids)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return Output(last_hidden_state=hidden, pooler_output=pooled, modality="text")


def expected(encoder: KeywordEncoder, tokens: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    with torch.inference_mode():
        out = encoder(tokens["input_ids"][None], tokens["attention_mask"][None])
    return out[key][0]


def test_dict_batch_is_passed_as_keywords_and_one_output_is_cached(store_path) -> None:
    data, encoder = token_samples(), KeywordEncoder()
    cached = CachedFeatureDataset(
        data, encoder, store_path, input_key="tokens", output="pooler_output", batch_size=8, spot_check=0
    )
    served = cached.__getitems__(list(range(len(data))))
    for i, sample in enumerate(served):
        assert sample["label"] == i % 3
        torch.testing.assert_close(sample["tokens"], expected(encoder, data[i]["tokens"], "pooler_output"))
    calls = cached.module_calls
    again = CachedFeatureDataset(
        data, encoder, store_path, input_key="tokens", output="pooler_output", spot_check=0
    )
    hits = again.__getitems__(list(range(len(data))))
    assert again.module_calls == 0 and calls > 0
    for hit, miss in zip(hits, served, strict=True):
        assert torch.equal(hit["tokens"], miss["tokens"])


def test_auto_passes_a_dict_as_one_argument_to_a_forward_that_takes_it(store_path) -> None:
    class TakesDict(nn.Module):
        def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return batch["input_ids"].float() * batch["attention_mask"]

    data = token_samples(6)
    cached = CachedFeatureDataset(data, TakesDict().eval(), store_path, input_key="tokens", spot_check=0)
    tokens = data[2]["tokens"]
    assert torch.equal(cached[2]["tokens"], tokens["input_ids"].float() * tokens["attention_mask"])


def test_explicit_kwargs_with_a_tensor_batch_says_what_to_do(store_path) -> None:
    data = Listed([torch.ones(3) * i for i in range(4)])
    with pytest.raises(CallConventionError, match=r"Got a Tensor of shape \(1, 3\).*call='positional'"):
        CachedFeatureDataset(data, KeywordEncoder(), store_path, call="kwargs")
    with pytest.raises(ValueError, match=r"Expected call to be one of \['positional', 'kwargs', 'auto'\]"):
        CachedFeatureDataset(data, KeywordEncoder(), store_path, call="keywords")  # type: ignore[arg-type]


def test_positional_keeps_calling_with_one_argument(store_path) -> None:
    data = token_samples(4)
    with pytest.raises(TypeError, match="must be Tensor, not dict"):  # the dict reaches nn.Embedding
        CachedFeatureDataset(
            data, KeywordEncoder(), store_path, input_key="tokens", call="positional", output=0
        )


def test_non_tensor_output_names_the_key_and_suggests_output(store_path) -> None:
    with pytest.raises(
        ModuleOutputError,
        match=r"returned an? Output of \['Tensor', 'Tensor', 'str'\] \('modality' is a str, not a tensor\).*"
        r"Pass output='pooler_output'.*\['last_hidden_state', 'pooler_output'\]",
    ):
        CachedFeatureDataset(token_samples(4), KeywordEncoder(), store_path, input_key="tokens")


@pytest.mark.parametrize(
    ("output", "key"),
    [
        ("last_hidden_state", "last_hidden_state"),  # a key
        (1, "pooler_output"),  # a position, as ModelOutput's to_tuple orders them
        (lambda out: out.pooler_output * 2, None),  # a callable
    ],
)
def test_output_selects_by_key_index_or_callable(store_path, output: Any, key: str | None) -> None:
    data, encoder = token_samples(5), KeywordEncoder()
    cached = CachedFeatureDataset(data, encoder, store_path, input_key="tokens", output=output, spot_check=0)
    want = expected(encoder, data[3]["tokens"], key or "pooler_output") * (1 if key else 2)
    torch.testing.assert_close(cached[3]["tokens"], want)


def test_output_selects_an_attribute_of_a_plain_object(store_path) -> None:
    class Result:
        def __init__(self, embedding: torch.Tensor) -> None:
            self.embedding = embedding
            self.note = "plain"

    class ReturnsObject(nn.Module):
        def forward(self, x: torch.Tensor) -> Result:
            return Result(x * 3)

    data = Listed([torch.ones(2) * i for i in range(4)])
    with pytest.raises(ModuleOutputError, match=r"a Result; .*Pass output='embedding'"):
        CachedFeatureDataset(data, ReturnsObject().eval(), store_path)
    cached = CachedFeatureDataset(data, ReturnsObject().eval(), store_path, output="embedding")
    assert torch.equal(cached[2], torch.ones(2) * 6)
    with pytest.raises(
        ModuleOutputError, match=r"output='embeding' is not an attribute.*\['embedding', 'note'\]"
    ):
        CachedFeatureDataset(data, ReturnsObject().eval(), store_path, output="embeding")


def test_wrong_output_key_lists_the_keys(store_path) -> None:
    with pytest.raises(
        ModuleOutputError,
        match=r"'pooled' is not a key.*\['last_hidden_state', 'pooler_output', 'modality'\]",
    ):
        CachedFeatureDataset(
            token_samples(4), KeywordEncoder(), store_path, input_key="tokens", output="pooled"
        )
    with pytest.raises(ModuleOutputError, match="pass an index from 0 to 2"):
        CachedFeatureDataset(token_samples(4), KeywordEncoder(), store_path, input_key="tokens", output=5)
    with pytest.raises(TypeError, match="Expected output to be a key"):
        CachedFeatureDataset(token_samples(4), KeywordEncoder(), store_path, output=1.5)  # type: ignore[arg-type]


def scale_by(factor: float) -> Any:
    return lambda out: out.pooler_output * factor


def test_output_selection_is_part_of_the_entry_key(store_path) -> None:
    data, encoder = token_samples(4), KeywordEncoder()

    def entry(**kwargs: Any) -> str:
        return CachedFeatureDataset(
            data, encoder, store_path, input_key="tokens", spot_check=0, **kwargs
        ).entry_name

    by_key = entry(output="pooler_output")
    assert entry(output="pooler_output") == by_key
    assert entry(output="last_hidden_state") != by_key
    assert entry(output=1) != by_key
    doubled = entry(output=scale_by(2.0))
    assert entry(output=scale_by(2.0)) == doubled  # the same code and closure: the same entry
    assert entry(output=scale_by(3.0)) != doubled  # a closure cell changed
    assert entry(output="pooler_output", call="kwargs") != by_key  # an explicit convention


class SeesDevice:
    """A plain function module that records where its inputs are (its output is on the CPU)."""

    def __init__(self) -> None:
        self.devices: list[tuple[str, ...]] = []

    def __call__(self, batch: Any) -> torch.Tensor:
        leaves = [batch["a"], batch["nested"]["b"], batch["pair"].first, batch["items"][0]]
        self.devices.append(tuple(t.device.type for t in leaves))
        return torch.zeros(len(batch["a"]), 2)


class Pair(NamedTuple):
    first: torch.Tensor
    second: int


def test_every_mapping_in_the_batch_moves_to_the_device() -> None:
    def collate(inputs: list[Any]) -> UserDict[str, Any]:
        a = torch.stack([x for x in inputs])
        return UserDict(
            {"a": a, "nested": UserDict({"b": a + 1}), "pair": Pair(a * 2, 1), "items": [a * 3], "tag": "x"}
        )

    module = SeesDevice()
    data = Listed([torch.ones(3) * i for i in range(4)])
    cached = CachedFeatureDataset(data, module, None, device="meta", collate_fn=collate)
    assert cached[1].shape == (2,)
    assert module.devices and all(devices == ("meta",) * 4 for devices in module.devices)


def test_collated_mapping_is_not_changed_in_place() -> None:
    shared = {"a": torch.ones(2, 3)}
    batches: list[Any] = []

    def collate(inputs: list[Any]) -> Any:
        batches.append(shared)
        return shared

    def module(batch: Any) -> torch.Tensor:
        return torch.zeros(1, 2)

    CachedFeatureDataset(Listed([torch.ones(3)]), module, None, device="meta", collate_fn=collate)
    assert batches and shared["a"].device.type == "cpu"


def test_loader_and_prefill_call_with_keywords(store_path) -> None:
    data, encoder = token_samples(20), KeywordEncoder()
    cached = CachedFeatureDataset(
        data,
        encoder,
        store_path,
        input_key="tokens",
        output="pooler_output",
        collate_fn=collate_encoding,
        batch_size=8,
        spot_check=0,
    )
    result = cached.prefill(progress=False)
    assert result.computed == len(data) - 1  # the probe's row is already stored
    other = CachedFeatureDataset(
        token_samples(20, length=5),
        encoder,
        store_path,
        input_key="tokens",
        output="pooler_output",
        collate_fn=collate_encoding,
        batch_size=8,
        spot_check=0,
    )
    rows = [batch for batch in other.loader(batch_size=8)]
    features = torch.cat([batch["tokens"] for batch in rows])
    fresh = token_samples(20, length=5)
    for i in (0, 7, 19):
        torch.testing.assert_close(features[i], expected(encoder, fresh[i]["tokens"], "pooler_output"))


def test_a_bare_string_sample_is_its_own_input(store_path) -> None:
    def lengths(texts: list[str]) -> torch.Tensor:
        return torch.tensor([[float(len(text))] for text in texts])

    data = Listed(["a", "bb", "ccc"])
    cached = CachedFeatureDataset(data, lambda x: x * 2, store_path, collate_fn=lengths)
    assert cached[2].tolist() == [6.0]
    with pytest.raises(KeyError, match="input_key 'text' cannot index a sample of type str"):
        CachedFeatureDataset(data, lambda x: x * 2, store_path, collate_fn=lengths, input_key="text")


def test_a_callable_output_of_two_arguments_gets_the_batch(store_path) -> None:
    def masked_sum(out: Any, batch: Any) -> torch.Tensor:
        return (out.last_hidden_state * batch["attention_mask"][..., None]).sum(1)

    data, encoder = token_samples(6), KeywordEncoder()
    cached = CachedFeatureDataset(data, encoder, store_path, input_key="tokens", output=masked_sum)
    tokens = data[4]["tokens"]
    hidden = expected(encoder, tokens, "last_hidden_state")
    torch.testing.assert_close(cached[4]["tokens"], (hidden * tokens["attention_mask"][:, None]).sum(0))


def test_a_dict_with_keys_forward_does_not_take_says_why_it_was_one_argument(store_path) -> None:
    def with_offsets(inputs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = {key: torch.stack([item[key] for item in inputs]) for key in inputs[0]}
        return {**batch, "offset_mapping": torch.zeros(len(inputs), 2)}

    with pytest.raises(TypeError) as info:
        CachedFeatureDataset(
            token_samples(4), KeywordEncoder(), store_path, input_key="tokens", collate_fn=with_offsets
        )
    note = "\n".join(getattr(info.value, "__notes__", []))
    assert "because ['offset_mapping'] are not parameters of the module's forward" in note
    assert "call='kwargs'" in note
