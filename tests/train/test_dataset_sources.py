"""Where the pairs come from (``fastpref.train.data.open_split``): a folder in the Hub's layout, a
``save_to_disk`` folder, parquet, a Hub id (``datasets.load_dataset`` with ``--cache_dir``); the
seeded ``--max_train_samples`` subset; rows that do not decode found at fetch; random crops and
flips. Tiny toy rows, offline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("datasets")
pytest.importorskip("diffusers")

from offline import RES  # noqa: E402

from fastpref.testing.toy_data import (  # noqa: E402
    corrupt_rows,
    make_rows,
    write_hub_layout,
    write_parquet,
    write_saved_dataset,
)
from fastpref.train import arguments, checks, data  # noqa: E402
from fastpref.train.data import PairSampler, PreferenceDataset, collate_pairs  # noqa: E402
from fastpref.train.families import FAMILIES  # noqa: E402

pytestmark = pytest.mark.usefixtures("offline_hub")


@pytest.fixture(scope="module")
def rows():
    """12 train rows and 5 validation rows (other seeds, so other captions)."""
    return {"train": make_rows(12, resolution=RES, seed=3), "validation": make_rows(5, resolution=RES, seed=4)}


def captions(dataset):
    return [dataset.caption(int(r)) for r in dataset.rows]


def test_hub_layout_reads_only_the_chosen_split(rows, tmp_path):
    folder = write_hub_layout(rows, tmp_path / "hub", files_per_split=2)
    train = PreferenceDataset(folder, RES)
    assert train.num_rows == 12 and train.split == "train" and train.summary()["split"] == "train"
    assert set(captions(train)) <= set(rows["train"]["caption"])
    validation = PreferenceDataset(folder, RES, split="validation")
    assert validation.num_rows == 5 and set(captions(validation)) <= set(rows["validation"]["caption"])
    with pytest.raises(ValueError, match="--dataset_split_name: .* no split 'test'"):
        PreferenceDataset(folder, RES, split="test")


def test_save_to_disk_folders(rows, tmp_path):
    plain = PreferenceDataset(write_saved_dataset(rows["train"], tmp_path / "saved"), RES)
    parquet = PreferenceDataset(write_parquet(rows["train"], tmp_path / "p" / "train.parquet"), RES)
    assert plain.summary() == parquet.summary() and plain.rows.tolist() == parquet.rows.tolist()
    assert torch.equal(plain[3]["pixel_values"], parquet[3]["pixel_values"])
    split = PreferenceDataset(
        write_saved_dataset(rows["validation"], tmp_path / "dict", "validation"), RES, split="validation"
    )
    assert split.num_rows == 5
    with pytest.raises(ValueError, match="--dataset_split_name"):
        PreferenceDataset(tmp_path / "dict", RES)  # it holds no train split


def test_image_features_and_index_mappings(rows):
    """Image cells as Hugging Face ``Image`` structs, and a ``select``ed dataset (an index mapping
    over the stored rows): the empty-cell check follows the mapping without reading the bytes."""
    import datasets

    columns = {name: list(values) for name, values in rows["train"].items()}
    columns["jpg_1"][3] = None
    stored = datasets.Dataset.from_dict(columns).cast_column("jpg_0", datasets.Image(decode=False))
    picked = stored.select([5, 3, 7, 1])
    dataset = PreferenceDataset(picked, RES)
    assert dataset.num_rows == 4 and dataset.skipped["malformed"] == [1]  # stored row 3
    assert dataset.caption(0) == columns["caption"][5]
    plain = PreferenceDataset(datasets.Dataset.from_dict(rows["train"]).select([5]), RES)
    assert torch.equal(dataset[0]["pixel_values"], plain[0]["pixel_values"])


def test_a_hub_id_goes_to_load_dataset_with_the_cache_dir(rows, monkeypatch, tmp_path):
    import datasets

    calls = []

    def load_dataset(name, **kwargs):
        calls.append((name, kwargs))
        return datasets.Dataset.from_dict(rows["train"])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    argv = ["--pretrained_model_name_or_path", "m", "--dataset_name", "someone/pairs", "--output_dir", "o"]
    data_args, _, _ = arguments.parse_args(
        [*argv, "--cache_dir", str(tmp_path / "hf"), "--dataset_split_name", "train"]
    )
    checks.check_dataset_path(data_args.dataset_name)  # a Hub id passes the path check
    dataset = PreferenceDataset(
        data_args.dataset_name, RES, split=data_args.dataset_split_name, cache_dir=data_args.cache_dir
    )
    assert calls == [("someone/pairs", {"split": "train", "cache_dir": str(tmp_path / "hf")})]
    assert dataset.num_rows == 12
    with pytest.raises(arguments.ArgumentError, match="--dataset_name: no such file or folder"):
        checks.check_dataset_path(str(tmp_path / "missing"))


def test_max_train_samples_is_a_seeded_subset_as_datasets_shuffle_picks(toy):
    import datasets

    whole = PreferenceDataset(toy, RES)
    a = PreferenceDataset(toy, RES, max_pairs=7, subset_seed=1)
    assert len(a) == 7 and a.summary()["num_pairs"] == 7
    assert a.rows.tolist() == PreferenceDataset(toy, RES, max_pairs=7, subset_seed=1).rows.tolist()
    assert a.rows.tolist() != PreferenceDataset(toy, RES, max_pairs=7, subset_seed=2).rows.tolist()
    picked = datasets.Dataset.from_dict({"i": list(range(len(whole)))}).shuffle(seed=1).select(range(7))["i"]
    assert a.rows.tolist() == sorted(whole.rows[picked].tolist())


def test_undecodable_rows_are_passed_over_at_fetch(rows, tmp_path):
    bad = corrupt_rows(rows["train"], [4, 5])
    dataset = PreferenceDataset(write_parquet(bad, tmp_path / "bad.parquet"), RES, check_images=False)
    assert len(dataset) == 12 and dataset.num_undecodable == 0  # nothing decoded up front
    index = dataset.rows.tolist().index(4)
    item = dataset[index]
    assert item["skipped_rows"] == [4, 5] and item["row"] == 6 and item["index"] == index + 2
    again = dataset[(index, 17)]
    assert torch.equal(again["pixel_values"], item["pixel_values"])
    batch = collate_pairs([dataset[index], dataset[index + 1], dataset[0]])
    assert batch["skipped_rows"] == [4, 5, 5] and batch["pixel_values"].shape[0] == 6
    summary = {}
    encoder = data.BatchEncoder(FAMILIES["sd15"], None, None, None, RES, "cpu", summary=summary)
    encoder.count_skips(batch)
    assert summary["undecodable_at_fetch"] == 2 and encoder.skips.state_dict() == {"rows": [4, 5]}


def test_random_crop_and_flip_are_seeded_by_position(tmp_path):
    from PIL import Image

    from fastpref.testing.toy_data import encode_jpeg

    gradient = np.tile(np.linspace(0, 255, 48, dtype=np.uint8), (32, 1))  # 48 wide, 32 high
    image = encode_jpeg(Image.fromarray(np.stack([gradient] * 3, axis=-1)))
    columns = {"caption": ["a"] * 4, "jpg_0": [image] * 4, "jpg_1": [image] * 4, "label_0": [1.0] * 4}
    file = write_parquet(columns, tmp_path / "g.parquet")
    plain = PreferenceDataset(file, 16)
    assert plain[0]["crop_top_lefts"].tolist() == [[0, 4], [0, 4]]  # centre crop of 24 x 16
    augmented = PreferenceDataset(file, 16, hflip=True, random_crop=True, augment_seed=5)
    items = [augmented[(0, position)] for position in range(16)]
    assert torch.equal(augmented[(0, 3)]["pixel_values"], items[3]["pixel_values"])  # same draw again
    flips = {bool(it["pixel_values"][0, 0, 0, 0] > it["pixel_values"][0, 0, 0, -1]) for it in items}
    assert flips == {True, False}  # the gradient runs both ways: some fetches are flipped
    lefts = {int(it["crop_top_lefts"][0, 1]) for it in items}
    assert len(lefts) > 1 and lefts <= set(range(9))
    assert all(torch.equal(it["crop_top_lefts"][0], it["crop_top_lefts"][1]) for it in items)  # one crop per pair
    stream = PairSampler(4, seed=0, infinite=True, with_position=True)
    assert [key for _, key in zip(range(5), stream)][4] == (PairSampler(4, seed=0).permutation(1)[0], 4)


def test_random_crop_with_cache_latents_is_refused(train_main, tmp_path):
    code, err = train_main(tmp_path / "out", "--random_crop", "--cache_latents")
    assert code == 2 and "--random_crop: cannot be combined with --cache_latents" in err


def test_train_on_a_hub_layout_folder_records_split_and_pairs(rows, train_main, tmp_path):
    folder = write_hub_layout(rows, tmp_path / "hub")
    out = tmp_path / "out"
    code, err = train_main(out, "--dataset_name", folder, "--max_train_steps", 1, "--max_train_samples", 9)
    assert code == 0, err
    summary = json.loads((out / "train_summary.json").read_text())["data"]
    assert summary["split"] == "train" and summary["rows"] == 12 and summary["num_pairs"] == 9
    assert summary["undecodable_at_fetch"] == 0


def test_sigkill_and_resume_across_a_skipped_row_is_bitwise(train_subprocess, tmp_path):
    """Rows fetched at step 1 and step 3 do not decode; the run killed after checkpoint-2 and
    resumed from it ends with the uninterrupted run's weights, log and skip counts."""
    import signal

    from safetensors.torch import load_file

    batch, seed = 2, 0
    order = PairSampler(12, seed=seed, infinite=True)
    doomed = [order.index_at(0), order.index_at(2 * batch)]  # the first item of step 1 and of step 3
    columns = corrupt_rows(make_rows(12, resolution=RES, seed=5), doomed)
    write_parquet(columns, tmp_path / "data" / "train.parquet")  # no ties or bad labels: item i is row i
    args = ["--dataset_name", tmp_path / "data", "--seed", seed, "--max_train_steps", 3, "--checkpointing_steps", 2]

    def outcome(out):
        summary = json.loads((out / "train_summary.json").read_text())["data"]
        log = (out / "train_log.jsonl").read_text()
        return load_file(out / "pytorch_lora_weights.safetensors"), log, summary["undecodable_at_fetch"]

    train_subprocess(tmp_path / "whole", *args)
    weights, log, skipped = outcome(tmp_path / "whole")
    assert skipped == 2
    killed = train_subprocess(tmp_path / "cut", *args, fault="saved:2", check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    train_subprocess(tmp_path / "cut", *args, "--resume_from_checkpoint", "latest")
    resumed_weights, resumed_log, resumed_skipped = outcome(tmp_path / "cut")
    assert resumed_log == log and resumed_skipped == skipped
    assert resumed_weights.keys() == weights.keys() and all(resumed_weights[k].equal(weights[k]) for k in weights)
