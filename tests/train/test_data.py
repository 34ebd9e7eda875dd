"""The preference data pipeline: ``fastpref.train.data`` (dataset, sampler, batches, DeDPO
labels) and ``fastpref.train.latent_cache``.

Everything is built from the offline tiny models and toy data (``fastpref.testing``); nothing is
downloaded (HF_HUB_OFFLINE=1, and every path is a local folder). Sizes are tiny: the whole file
runs in seconds on two CPU cores.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("diffusers")
pytest.importorskip("pyarrow")

import pyarrow.parquet as pq  # noqa: E402
from offline import CORRUPT, PAIRS, RES, TIES  # noqa: E402

from fastpref.testing.toy_data import JUDGE_COLUMN, encode_jpeg, make_rows, write_parquet  # noqa: E402
from fastpref.train.data import (  # noqa: E402
    HumanOrder,
    JudgeOrder,
    PairSampler,
    PreferenceDataset,
    collate_pairs,
)
from fastpref.train.families import FAMILIES  # noqa: E402
from fastpref.train.latent_cache import LatentCache, cache_key  # noqa: E402
from fastpref.train.models import ModelSource  # noqa: E402

pytestmark = pytest.mark.usefixtures("offline_hub")


def solid(color, size=RES) -> bytes:
    from PIL import Image

    return encode_jpeg(Image.new("RGB", (size, size), color))


# --------------------------------------------------------------------------------------------
# dataset
# --------------------------------------------------------------------------------------------


def test_ties_dropped_or_kept_and_corrupt_row_counted(toy):
    dropped = PreferenceDataset(toy, RES, check_images=True)
    assert dropped.num_rows == PAIRS and dropped.num_undecodable == CORRUPT and dropped.num_malformed == 0
    assert dropped.num_ties == TIES and dropped.num_ties_dropped == TIES
    assert len(dropped) == PAIRS - TIES - CORRUPT
    kept = PreferenceDataset(toy, RES, keep_ties=True, check_images=True)
    assert len(kept) == PAIRS - CORRUPT and kept.num_ties_dropped == 0
    ties = [kept[i] for i in range(len(kept)) if kept[i]["tie"]]
    assert len(ties) == TIES and all(t["human_label"] == 0.5 for t in ties)
    for dataset in (dropped, kept):  # every served item decodes, in range and shape
        for i in range(len(dataset)):
            item = dataset[i]
            assert item["pixel_values"].shape == (2, 3, RES, RES)
            assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1
        assert set(dataset.skipped["undecodable"]).isdisjoint(dataset.rows.tolist())


def test_malformed_rows_skipped_and_counted(tmp_path):
    red, blue = solid((255, 0, 0)), solid((0, 0, 255))
    columns = {
        "caption": ["ok", "bad label", None, "no image", "nan label", "garbage", "ok too"],
        "jpg_0": [red, red, red, None, red, b"not an image", blue],
        "jpg_1": [blue, blue, blue, blue, blue, blue, red],
        "label_0": [1.0, 0.3, 1.0, 0.0, float("nan"), 1.0, 0.0],
    }
    dataset = PreferenceDataset(write_parquet(columns, tmp_path / "rows.parquet"), RES, check_images=True)
    assert dataset.skipped == {"malformed": [1, 2, 3, 4], "undecodable": [5]}
    assert len(dataset) == 2 and dataset.rows.tolist() == [0, 6]
    with pytest.raises(ValueError, match="label_0"):
        PreferenceDataset(
            write_parquet({"caption": ["x"], "jpg_0": [red], "jpg_1": [blue]}, tmp_path / "x.parquet"), RES
        )


def test_winner_first_by_label(tmp_path):
    red, blue = solid((255, 0, 0)), solid((0, 0, 255))
    columns = {"caption": ["a", "b"], "jpg_0": [red, red], "jpg_1": [blue, blue], "label_0": [1.0, 0.0]}
    dataset = PreferenceDataset(write_parquet(columns, tmp_path / "pairs.parquet"), 16)
    redness = lambda px: (px[0] - px[2]).mean().item()  # noqa: E731 - red minus blue channel
    first, second = dataset[0]["pixel_values"], dataset[1]["pixel_values"]
    assert redness(first[0]) > 1.5 and redness(first[1]) < -1.5  # label_0 = 1: jpg_0 (red) first
    assert redness(second[0]) < -1.5 and redness(second[1]) > 1.5  # label_0 = 0: jpg_1 (blue) first
    assert torch.equal(first, second.flip(0))
    assert dataset[1]["human_label"] == 1.0 and not dataset[1]["flipped"]


def test_folder_of_parquet_files(tmp_path, toy):
    table = pq.read_table(toy)
    folder = tmp_path / "folder"
    folder.mkdir()
    pq.write_table(table.slice(0, 10), folder / "part-0.parquet")
    pq.write_table(table.slice(10), folder / "part-1.parquet")
    whole, split = PreferenceDataset(toy, RES), PreferenceDataset(folder, RES)
    assert split.summary() == whole.summary()
    assert split.rows.tolist() == whole.rows.tolist()
    assert torch.equal(split[len(split) - 1]["pixel_values"], whole[len(whole) - 1]["pixel_values"])


def test_flip_rate_exact_count_seeded(toy):
    plain = PreferenceDataset(toy, RES, keep_ties=True)
    decided = sum(1 for i in range(len(plain)) if not plain[i]["tie"])
    for rate in (0.0, 0.1, 0.25, 1.0):
        flipped = PreferenceDataset(toy, RES, keep_ties=True, flip_rate=rate, flip_seed=7)
        assert flipped.num_flipped == int(flipped.flipped.sum()) == math.floor(rate * decided + 0.5)
    a = PreferenceDataset(toy, RES, keep_ties=True, flip_rate=0.25, flip_seed=7)
    b = PreferenceDataset(toy, RES, keep_ties=True, flip_rate=0.25, flip_seed=7)
    c = PreferenceDataset(toy, RES, keep_ties=True, flip_rate=0.25, flip_seed=8)
    assert a.flipped_rows == b.flipped_rows and a.flipped_rows != c.flipped_rows
    for i in range(len(a)):
        item, base = a[i], plain[i]
        assert item["row"] == base["row"]
        if item["flipped"]:
            assert not item["tie"] and item["human_label"] == 0.0
            assert torch.equal(item["pixel_values"], base["pixel_values"].flip(0))
        else:
            assert torch.equal(item["pixel_values"], base["pixel_values"])
    with pytest.raises(ValueError, match="flip_rate"):
        PreferenceDataset(toy, RES, flip_rate=1.5)


def test_sampler_order_is_seeded_and_resumes():
    n = 7
    full = PairSampler(n, seed=5, infinite=True)
    stream = [i for _, i in zip(range(3 * n), full)]
    assert stream == [i for _, i in zip(range(3 * n), PairSampler(n, seed=5, infinite=True))]
    assert stream != [i for _, i in zip(range(3 * n), PairSampler(n, seed=6, infinite=True))]
    for epoch in range(3):
        assert sorted(stream[epoch * n : (epoch + 1) * n]) == list(range(n))
    for position in (0, 3, n, n + 4):  # resume inside and across epoch boundaries
        resumed = PairSampler(n, seed=5, start=position, infinite=True)
        assert [i for _, i in zip(range(3 * n - position), resumed)] == stream[position:]
    one_pass = PairSampler(n, seed=5, start=n + 4)
    assert list(one_pass) == stream[n + 4 : 2 * n] and len(one_pass) == n - 4
    one_pass.set_epoch(2)
    assert list(one_pass) == stream[2 * n :]
    state = PairSampler(n, seed=5, start=9).state_dict()
    restored = PairSampler(n, seed=0)
    restored.load_state_dict(state)
    assert list(restored) == stream[9 : 2 * n]


def test_dataloader_batches_resume_bitwise(toy):
    dataset = PreferenceDataset(toy, RES, flip_rate=0.2, flip_seed=1)
    loader = lambda start: torch.utils.data.DataLoader(  # noqa: E731
        dataset,
        batch_size=4,
        sampler=PairSampler(len(dataset), seed=2, start=start, infinite=True),
        collate_fn=collate_pairs,
    )
    batches = [b for _, b in zip(range(6), loader(0))]
    assert batches[0]["pixel_values"].shape == (8, 3, RES, RES)
    assert batches[0]["flipped"].dtype == torch.bool and batches[0]["index"].dtype == torch.int64
    assert isinstance(batches[0]["captions"], list) and len(batches[0]["captions"]) == 4
    resumed = [b for _, b in zip(range(3), loader(3 * 4))]
    for ours, theirs in zip(resumed, batches[3:]):
        assert torch.equal(ours["pixel_values"], theirs["pixel_values"])
        assert torch.equal(ours["index"], theirs["index"]) and ours["captions"] == theirs["captions"]


def test_pair_layout():
    pairs = torch.arange(3 * 2 * 5, dtype=torch.float32).reshape(3, 2, 5)
    batch = collate_pairs([{"latents": pair} for pair in pairs])["latents"]
    assert torch.equal(batch[:3], pairs[:, 0]) and torch.equal(batch[3:], pairs[:, 1])


# --------------------------------------------------------------------------------------------
# latent cache
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoders(models):
    return {arch: FAMILIES[arch].load_encoders(ModelSource(str(models[arch]))) for arch in models}


def counted(vae):
    calls = []
    original = vae.encode

    def encode(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    vae.encode = encode
    return calls


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_latent_cache_hit_reuses_and_matches(models, encoders, toy, tmp_path, monkeypatch, arch):
    vae, tokenizers, text_encoders = encoders[arch]
    calls = counted(vae)
    dataset = PreferenceDataset(toy, RES, flip_rate=0.25, flip_seed=3, check_images=True)
    kwargs = dict(vae=vae, tokenizers=tokenizers, text_encoders=text_encoders, batch_size=4, shard_size=8)
    first = LatentCache.build(dataset, tmp_path, models[arch], **kwargs)
    assert not first.hit and calls and first.path.parent == tmp_path
    assert len(first) == PAIRS - CORRUPT and first.pair(0)["latents"].shape == (2, 4, RES // 8, RES // 8)
    assert len(list(first.path.glob("latents-*.safetensors"))) == math.ceil(PAIRS / 8)

    n_calls = len(calls)
    second = LatentCache.build(dataset, tmp_path, models[arch], **kwargs)
    assert second.hit and len(calls) == n_calls  # no VAE call on a hit
    assert second.key == first.key
    for position in range(len(first)):
        assert torch.equal(second.pair(position)["latents"], first.pair(position)["latents"])
    for index in range(int(first.caption_index.max()) + 1):
        assert torch.equal(second.text(index)["prompt_embeds"], first.text(index)["prompt_embeds"])
    # A hit never loads the models either.
    monkeypatch.setattr(FAMILIES[arch], "load_encoders", lambda *a, **k: pytest.fail("models loaded on a cache hit"))
    assert LatentCache.build(dataset, tmp_path, models[arch]).hit

    # The view serves what the pixel path encodes: winner first, flips applied, same captions.
    view = second.view(dataset)
    assert len(view) == len(dataset)
    for i in (0, 3, len(dataset) - 1):
        item, pixels = view[i], dataset[i]
        assert item["row"] == pixels["row"] and item["flipped"] == pixels["flipped"]
        family = FAMILIES[arch]
        latents = family.encode_images(vae, pixels["pixel_values"])
        torch.testing.assert_close(item["latents"], latents, atol=1e-5, rtol=1e-5)
        text = family.encode_prompts([pixels["caption"]], tokenizers, text_encoders)
        torch.testing.assert_close(item["prompt_embeds"], text["prompt_embeds"][0], atol=1e-5, rtol=1e-5)
        if arch == "sdxl":
            torch.testing.assert_close(
                item["pooled_prompt_embeds"], text["pooled_prompt_embeds"][0], atol=1e-5, rtol=1e-5
            )
        else:
            assert "pooled_prompt_embeds" not in item
    batch = collate_pairs([view[i] for i in range(4)])
    assert batch["latents"].shape == (8, 4, RES // 8, RES // 8) and batch["prompt_embeds"].shape[:2] == (4, 77)
    assert torch.equal(batch["latents"][:4], torch.stack([view[i]["latents"][0] for i in range(4)]))

    # A dataset that did not decode its images up front learns the undecodable row from the cache.
    unchecked = PreferenceDataset(toy, RES, flip_rate=0.25, flip_seed=3, check_images=False)
    assert unchecked.num_undecodable == 0 and len(unchecked) == len(dataset) + 1
    lazy_view = second.view(unchecked)
    assert lazy_view.dataset.num_undecodable == CORRUPT and len(lazy_view) == len(view)
    assert lazy_view.dataset.flipped_rows == dataset.flipped_rows
    assert torch.equal(lazy_view[5]["latents"], view[5]["latents"])


def test_cache_key_depends_on_dataset_model_and_resolution(models, toy, tmp_path):
    base = PreferenceDataset(toy, RES)
    key = cache_key(base, models["sd15"])[0]
    assert cache_key(PreferenceDataset(toy, RES), models["sd15"])[0] == key
    # Ties, flips and truncation apply on top of the cache: same key.
    assert cache_key(PreferenceDataset(toy, RES, keep_ties=True, flip_rate=0.5, max_pairs=3), models["sd15"])[0] == key
    assert cache_key(PreferenceDataset(toy, 2 * RES), models["sd15"])[0] != key
    assert cache_key(base, models["sdxl"])[0] != key
    assert cache_key(base, models["sd15"], dtype=torch.float16)[0] != key
    other = write_parquet(make_rows(PAIRS, resolution=RES, seed=1), tmp_path / "other.parquet")
    assert cache_key(PreferenceDataset(other, RES), models["sd15"])[0] != key


# --------------------------------------------------------------------------------------------
# DeDPO mode: the judge's column, the human-labelled subset, propensity (docs/spec.md §5b)
# --------------------------------------------------------------------------------------------


def judged_file(path, label_0, judge, colors=None):
    """One row per (label_0, judge) with solid images: jpg_0 red, jpg_1 blue (or ``colors``)."""
    red, blue = solid((255, 0, 0)), solid((0, 0, 255))
    n = len(label_0)
    columns = {
        "caption": [f"pair {i}" for i in range(n)],
        "jpg_0": [red] * n if colors is None else [solid(c[0]) for c in colors],
        "jpg_1": [blue] * n if colors is None else [solid(c[1]) for c in colors],
        "label_0": list(label_0),
        JUDGE_COLUMN: list(judge),
    }
    return write_parquet(columns, path)


def redness(pixels):
    return (pixels[0] - pixels[2]).mean().item()  # red minus blue channel


def test_plain_mode_ignores_the_judge_column(toy, toy_judge):
    """Defaults are today's behaviour bit for bit, judge column or not."""
    plain, with_judge = (
        PreferenceDataset(toy, RES, flip_rate=0.25, flip_seed=2),
        PreferenceDataset(toy_judge, RES, flip_rate=0.25, flip_seed=2),
    )
    assert with_judge.summary() == plain.summary() and with_judge.judge_malformed_rows == []
    for i in (0, 5, len(plain) - 1):
        a, b = plain[i], with_judge[i]
        assert a.keys() == b.keys() and "synthetic_label" not in b and "human_mask" not in b
        assert all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)
    with pytest.raises(ValueError, match="synthetic_labels"):
        with_judge.judge_agreement()
    with pytest.raises(ValueError, match=JUDGE_COLUMN):
        PreferenceDataset(toy, RES, synthetic_labels=True)  # no judge column in that file


def test_dedpo_orders_by_judge_not_by_label(tmp_path):
    label_0 = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    judge = [0.9, 0.9, 0.2, 0.2, 0.5, 0.5]
    dataset = PreferenceDataset(judged_file(tmp_path / "p.parquet", label_0, judge), 16, synthetic_labels=True)
    assert len(dataset) == 6 and dataset.propensity == 1.0 and bool(dataset.human_mask.all())
    for i, (label, p) in enumerate(zip(label_0, judge)):
        item = dataset[i]
        first_is_jpg0 = p >= 0.5  # the judge decides, ties of the judge keep jpg_0 first
        assert (redness(item["pixel_values"][0]) > 1.5) == first_is_jpg0
        assert (redness(item["pixel_values"][1]) > 1.5) == (not first_is_jpg0)
        assert item["synthetic_label"] == (p if first_is_jpg0 else 1 - p) >= 0.5
        human_prefers_jpg0 = label == 1.0
        assert item["human_label"] == float(human_prefers_jpg0 == first_is_jpg0)
        assert item["human_mask"] is True and item["propensity"] == 1.0 and not item["flipped"] and not item["tie"]
    # Pairs with the same judge value are served in the same order whatever label_0 says.
    for a, b in ((0, 1), (2, 3), (4, 5)):
        assert torch.equal(dataset[a]["pixel_values"], dataset[b]["pixel_values"])
        assert dataset[a]["human_label"] == 1 - dataset[b]["human_label"]


def test_dedpo_human_fraction_exact_count_propensity_seeded(toy_judge):
    table = pq.read_table(toy_judge)
    label_0, judge = table.column("label_0").to_pylist(), table.column(JUDGE_COLUMN).to_pylist()
    n = PAIRS - TIES - CORRUPT
    masks = {}
    for fraction in (0.01, 0.1, 0.25, 0.5, 0.999, 1.0):
        dataset = PreferenceDataset(toy_judge, RES, synthetic_labels=True, human_fraction=fraction, human_seed=4)
        expected = max(1, math.floor(fraction * n + 0.5))
        mask = dataset.human_mask
        assert len(dataset) == n and dataset.num_ties_dropped == TIES and dataset.num_undecodable == CORRUPT
        assert mask.dtype == torch.bool and int(mask.sum()) == dataset.num_human_labelled == expected
        assert dataset.propensity == expected / n and dataset.summary()["human_labelled"] == expected
        for i in range(n):
            item = dataset.item_info(i)
            row = item["row"]
            assert item["human_mask"] == bool(mask[i]) and item["propensity"] == expected / n
            swap = judge[row] < 0.5
            assert item["swap"] == swap and item["synthetic_label"] == (1 - judge[row] if swap else judge[row])
            if item["human_mask"]:
                assert item["human_label"] == float((label_0[row] == 1.0) != swap)
            else:
                assert math.isnan(item["human_label"])
        masks[fraction] = mask
    # Larger fractions with the same seed keep a superset; another seed picks other pairs; the
    # flip seed does not move the choice.
    assert bool((masks[0.25] <= masks[0.5]).all()) and bool((masks[0.01] <= masks[0.1]).all())
    again = PreferenceDataset(toy_judge, RES, synthetic_labels=True, human_fraction=0.5, human_seed=4, flip_seed=99)
    other = PreferenceDataset(toy_judge, RES, synthetic_labels=True, human_fraction=0.5, human_seed=5)
    assert torch.equal(again.human_mask, masks[0.5]) and not torch.equal(other.human_mask, masks[0.5])
    everyone = PreferenceDataset(toy_judge, RES, synthetic_labels=True)  # human_fraction=None: 1.0
    assert everyone.propensity == 1.0 and everyone.num_human_labelled == n
    assert (
        len(PreferenceDataset(toy_judge, RES, synthetic_labels=True, human_fraction=0.5, max_pairs=7).human_mask) == 7
    )


def test_dedpo_flips_apply_to_human_labels_and_bad_combinations_raise(toy_judge):
    kwargs = dict(synthetic_labels=True, human_fraction=0.5, human_seed=1)
    base = PreferenceDataset(toy_judge, RES, **kwargs)
    flipped = PreferenceDataset(toy_judge, RES, flip_rate=0.5, flip_seed=3, **kwargs)
    m = base.num_human_labelled
    assert flipped.num_flipped == int(flipped.flipped.sum()) == math.floor(0.5 * m + 0.5) > 0
    assert bool((flipped.flipped <= flipped.human_mask).all())  # only labelled pairs flip
    assert torch.equal(flipped.human_mask, base.human_mask)
    for i in range(len(base)):
        a, b = base[i], flipped[i]
        assert torch.equal(a["pixel_values"], b["pixel_values"])  # flips never reorder in DeDPO mode
        assert a["synthetic_label"] == b["synthetic_label"]
        if b["flipped"]:
            assert b["human_label"] == 1 - a["human_label"]
        else:
            assert a["human_label"] == b["human_label"] or (
                math.isnan(a["human_label"]) and math.isnan(b["human_label"])
            )
    assert PreferenceDataset(toy_judge, RES, flip_rate=1.0, **kwargs).num_flipped == m

    with pytest.raises(ValueError, match="keep_ties"):
        PreferenceDataset(toy_judge, RES, keep_ties=True, **kwargs)
    with pytest.raises(ValueError, match="human_fraction"):
        PreferenceDataset(toy_judge, RES, human_fraction=0.5)  # no synthetic_labels
    for bad in (0.0, -0.1, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="human_fraction"):
            PreferenceDataset(toy_judge, RES, synthetic_labels=True, human_fraction=bad)
    with pytest.raises(ValueError, match="human_seed"):
        PreferenceDataset(toy_judge, RES, synthetic_labels=True, human_seed=1.5)


def test_dedpo_malformed_judge_values_skipped_and_counted(tmp_path):
    judge = [0.7, None, float("nan"), -0.01, 1.5, 0.0, 1.0, float("inf")]
    label_0 = [1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    file = judged_file(tmp_path / "bad.parquet", label_0, judge)
    dataset = PreferenceDataset(file, RES, synthetic_labels=True)
    assert dataset.skipped == {"malformed": [1, 2, 3, 4, 7], "undecodable": []}
    assert dataset.judge_malformed_rows == [1, 2, 3, 4, 7] and dataset.summary()["judge_malformed"] == 5
    assert dataset.rows.tolist() == [0, 5, 6] and dataset.num_malformed == 5
    assert [dataset[i]["synthetic_label"] for i in range(3)] == [0.7, 1.0, 1.0]  # 0 and 1 are valid
    plain = PreferenceDataset(file, RES)  # the judge is not read outside DeDPO mode
    assert plain.num_malformed == 0 and len(plain) == len(judge)


class LoserFirst(HumanOrder):
    """A custom label policy: the human's loser first."""

    def assign(self, label, values, flip_rate, flip_seed, num_unusable):
        labels = super().assign(label, values, flip_rate, flip_seed, num_unusable)
        return dataclasses.replace(labels, swap=~labels.swap, human_label=1.0 - labels.human_label)


def test_a_label_policy_object_replaces_the_keywords(tmp_path):
    """``label_policy=`` serves what the keywords it replaces serve; a custom policy orders the pairs."""
    file = judged_file(tmp_path / "p.parquet", [1.0, 0.0, 0.5, 1.0, 0.0, 1.0], [0.9, 0.9, 0.5, 0.2, 0.2, 0.6])
    for policy, keywords in (
        (HumanOrder(keep_ties=True), dict(keep_ties=True)),
        (JudgeOrder(human_fraction=0.5, human_seed=3), dict(synthetic_labels=True, human_fraction=0.5, human_seed=3)),
    ):
        by_policy = PreferenceDataset(file, 16, flip_rate=0.5, label_policy=policy)
        by_keywords = PreferenceDataset(file, 16, flip_rate=0.5, **keywords)
        assert by_policy.summary() == by_keywords.summary()
        for i in range(len(by_policy)):
            assert repr(by_policy.item_info(i)) == repr(by_keywords.item_info(i))  # NaN human labels too
            assert torch.equal(by_policy[i]["pixel_values"], by_keywords[i]["pixel_values"])
    human = PreferenceDataset(file, 16)
    custom = PreferenceDataset(file, 16, label_policy=LoserFirst())
    assert custom.rows.tolist() == human.rows.tolist()
    for i in range(len(custom)):
        assert torch.equal(custom[i]["pixel_values"], human[i]["pixel_values"].flip(0))
        assert custom[i]["human_label"] == 0.0
    with pytest.raises(ValueError, match="label_policy"):
        PreferenceDataset(file, 16, label_policy=LoserFirst(), synthetic_labels=True)


def test_judge_agreement_matches_a_hand_computation(tmp_path):
    label_0 = [1.0, 0.0, 1.0, 0.0, 1.0, 0.5]
    judge = [0.9, 0.8, 0.3, 0.2, 0.5, 0.6]  # right, wrong, wrong, right, no preference; a tie
    dataset = PreferenceDataset(judged_file(tmp_path / "a.parquet", label_0, judge), 16, synthetic_labels=True)
    assert len(dataset) == 5 and dataset.num_ties_dropped == 1
    stats = dataset.judge_agreement()
    assert stats["num_labelled"] == 5
    assert stats["accuracy"] == pytest.approx((1 + 0 + 0 + 1 + 0.5) / 5)
    assert stats["mean_abs_error"] == pytest.approx((0.1 + 0.8 + 0.7 + 0.2 + 0.5) / 5)
    # Only the labelled pairs count.
    some = PreferenceDataset(
        judged_file(tmp_path / "a.parquet", label_0, judge), 16, synthetic_labels=True, human_fraction=0.4, human_seed=2
    )
    mask = some.human_mask.numpy()
    p = np.asarray([0.9, 0.8, 0.3, 0.2, 0.5])
    y = np.asarray([1.0, 0.0, 1.0, 0.0, 1.0])  # label_0 of the served rows: |p - y| is order-free
    assert some.judge_agreement()["num_labelled"] == 2 == mask.sum()
    assert some.judge_agreement()["mean_abs_error"] == pytest.approx(np.abs(p - y)[mask].mean())


def test_dedpo_collate_plugs_into_the_dedpo_loss(toy_judge):
    from fastpref import reference

    dataset = PreferenceDataset(toy_judge, RES, synthetic_labels=True, human_fraction=0.25, human_seed=0, flip_rate=0.2)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=len(dataset), sampler=PairSampler(len(dataset), seed=1), collate_fn=collate_pairs
    )
    batch = next(iter(loader))
    B = len(dataset)
    for name in ("synthetic_label", "human_label", "propensity"):
        assert batch[name].dtype == torch.float32 and batch[name].shape == (B,)
    assert batch["human_mask"].dtype == torch.bool and batch["human_mask"].shape == (B,)
    assert int(batch["human_mask"].sum()) == dataset.num_human_labelled
    assert torch.isnan(batch["human_label"]).eq(~batch["human_mask"]).all()
    assert torch.equal(batch["propensity"], torch.full((B,), dataset.propensity, dtype=torch.float32))

    g = torch.Generator().manual_seed(0)
    model_pred = torch.randn(2 * B, 4, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    ref_pred, target = (
        torch.randn(2 * B, 4, 2, 2, generator=g, dtype=torch.float64),
        torch.randn(2 * B, 4, 2, 2, generator=g, dtype=torch.float64),
    )
    labels = {k: batch[k] for k in ("synthetic_label", "human_label", "human_mask", "propensity")}
    loss = reference.adaptive_dpo_loss(model_pred, ref_pred, target, loss_type="dedpo", beta=10.0, **labels)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(model_pred.grad).all()
    # Without weight and margin the per-pair loss is docs/spec.md §5b's with the batch's fields.
    per_pair = reference.adaptive_dpo_loss(
        model_pred,
        ref_pred,
        target,
        loss_type="dedpo",
        beta=10.0,
        weighting="none",
        margin="none",
        reduction="none",
        **labels,
    ).detach()
    e = lambda pred: (pred.detach() - target).square().flatten(1).mean(1)  # noqa: E731
    gain = e(ref_pred) - e(model_pred)
    q = 10.0 * (gain[:B] - gain[B:])
    yhat, pi = labels["synthetic_label"].double(), labels["propensity"].double()
    soft = yhat + torch.where(
        labels["human_mask"], (labels["human_label"].double() - yhat) / pi, torch.zeros_like(yhat)
    )
    torch.testing.assert_close(per_pair, torch.nn.functional.softplus(-q) + (1 - soft) * q)


def test_dedpo_cached_path_carries_the_fields(models, encoders, toy_judge, tmp_path):
    # One decodable, decided row gets a malformed judge value: DeDPO skips it, the cache keeps it.
    table = pq.read_table(toy_judge)
    plain_all = PreferenceDataset(toy_judge, RES)
    bad_row = int(plain_all.rows[2])
    judge = table.column(JUDGE_COLUMN).to_pylist()
    judge[bad_row] = float("nan")
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    columns[JUDGE_COLUMN] = judge
    file = write_parquet(columns, tmp_path / "data" / "train.parquet")

    vae, tokenizers, text_encoders = encoders["sd15"]
    kwargs = dict(synthetic_labels=True, human_fraction=0.3, human_seed=2, flip_rate=0.5, flip_seed=1)
    checked = PreferenceDataset(file, RES, **kwargs)
    unchecked = PreferenceDataset(file, RES, check_images=False, **kwargs)
    assert checked.judge_malformed_rows == [bad_row] and bad_row not in checked.rows.tolist()
    plain = PreferenceDataset(file, RES)
    assert cache_key(unchecked, models["sd15"])[0] == cache_key(plain, models["sd15"])[0]  # the mode is not in the key

    cache = LatentCache.build(
        unchecked,
        tmp_path / "cache",
        models["sd15"],
        vae=vae,
        tokenizers=tokenizers,
        text_encoders=text_encoders,
        batch_size=8,
    )
    assert bad_row in cache.rows.tolist()  # encoded although DeDPO skips it
    view = cache.view(unchecked)
    assert len(view) == len(checked) and view.dataset.num_human_labelled == checked.num_human_labelled
    for i in range(len(view)):
        item, pixels = view[i], checked[i]
        for name in ("row", "flipped", "human_mask", "propensity", "synthetic_label"):
            assert item[name] == pixels[name], name
        assert item["human_label"] == pixels["human_label"] or (
            math.isnan(item["human_label"]) and math.isnan(pixels["human_label"])
        )
        if i in (0, len(view) - 1):
            torch.testing.assert_close(
                item["latents"], FAMILIES["sd15"].encode_images(vae, pixels["pixel_values"]), atol=1e-5, rtol=1e-5
            )
    batch = collate_pairs([view[i] for i in range(5)])
    assert batch["synthetic_label"].dtype == torch.float32 and batch["human_mask"].dtype == torch.bool
    assert batch["latents"].shape == (10, 4, RES // 8, RES // 8)
    # The cache built in DeDPO mode serves a plain dataset of the same file (it has the row).
    hit = LatentCache.build(plain, tmp_path / "cache", models["sd15"])
    assert hit.hit and len(hit.view(plain)) == len(plain)
