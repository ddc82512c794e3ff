"""The demo's output: what it shows must be honest about where a cached epoch's time goes."""

from __future__ import annotations

import re

import pytest

from cachedfeatures import demo


@pytest.mark.slow
def test_demo_splits_feature_serving_from_the_head_step(capsys: pytest.CaptureFixture[str]) -> None:
    """A cached epoch's time is mostly the head's backward and optimizer step on a fast store:
    the demo shows that part apart from the features, and says which speed-up is which."""
    demo.main(["--samples", "128", "--epochs", "2", "--batch-size", "64"])
    out = capsys.readouterr().out
    epochs = re.findall(
        r"epoch \d: +([\d.]+) s = features +([\d.]+) s \((.+?)\) \+ head step +([\d.]+) s", out
    )
    assert [where for *_, where, _ in epochs] == [
        "decode + backbone",
        "computed and stored",
        "read from the store",
    ]
    for total, features, _, head in epochs:
        assert abs(float(total) - float(features) - float(head)) <= 0.011  # the parts add up
    summary = out.strip().splitlines()[-1]
    assert re.search(r"features served \d+x faster .* whole cached epochs [\d.]+x faster", summary)
    assert "head's own training step" in summary


def test_demo_images_come_as_dicts_or_tuples() -> None:
    image, label = demo.CompressedImages(4, size=8, samples="tuple")[2]
    sample = demo.CompressedImages(4, size=8)[2]
    assert sample["label"] == label and bool((sample["image"] == image).all())
    with pytest.raises(ValueError, match="Expected samples to be 'dict' or 'tuple'"):
        demo.CompressedImages(4, samples="list")  # type: ignore[arg-type]
