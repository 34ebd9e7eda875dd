"""Prompt sets: text and JSON files, a datasets source with its split and caption column, and the
named sets resolved from local copies in their Hub repositories' layouts."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fastpref.evaluate.prompts import NAMED_SETS, load_prompts


def test_text_and_json_files(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("a cat\n\n  a dog \na cat\n")
    assert load_prompts(str(text)) == ["a cat", "a dog"]  # stripped, blank lines and repeats dropped
    listed = tmp_path / "p.json"
    listed.write_text(json.dumps(["x", "y", "z"]))
    assert load_prompts(str(listed), max_prompts=2) == ["x", "y"]
    objects = tmp_path / "o.json"
    objects.write_text(json.dumps([{"text": "x"}, {"text": "y"}]))
    assert load_prompts(str(objects), column="text") == ["x", "y"]
    with pytest.raises(ValueError, match="--caption_column: an object of .* has no key 'caption'"):
        load_prompts(str(objects))
    text.write_text("\n")
    with pytest.raises(ValueError, match="--prompts: .* holds no prompts"):
        load_prompts(str(text))


def test_a_datasets_folder_with_split_and_caption_column(tmp_path):
    """Pick-a-Pic's layout: data/<split>-*.parquet, prompts in ``caption``."""
    (tmp_path / "data").mkdir()
    table = pa.table({"caption": ["b", "a", "b"], "label_0": [1.0, 0.0, 0.5]})
    pq.write_table(table, tmp_path / "data" / "validation_unique-00000-of-00001.parquet")
    pq.write_table(pa.table({"caption": ["t"], "label_0": [1.0]}), tmp_path / "data" / "train-00000-of-00001.parquet")
    assert load_prompts(str(tmp_path), split="validation_unique") == ["b", "a"]
    with pytest.raises(ValueError, match="--caption_column: .* has no column 'prompt'"):
        load_prompts(str(tmp_path), split="validation_unique", column="prompt")
    with pytest.raises(ValueError, match="--prompt_split"):
        load_prompts(str(tmp_path), split="test")


def test_named_sets_from_local_copies_in_their_hub_layout(tmp_path):
    parti = tmp_path / "parti-prompts"  # nateraw/parti-prompts: PartiPrompts.tsv
    parti.mkdir()
    (parti / "PartiPrompts.tsv").write_text(
        "Prompt\tCategory\tChallenge\tNote\nbond\tAbstract\tBasic\t\nred car\tVehicles\tColors\t\n"
    )
    assert load_prompts("parti", set_path=str(parti)) == ["bond", "red car"]
    hpd = tmp_path / "HPDv2"  # zhwang/HPDv2: benchmark/<style>.json, a list of prompts each
    (hpd / "benchmark").mkdir(parents=True)
    for style in ("anime", "concept-art", "paintings", "photo"):
        (hpd / "benchmark" / f"{style}.json").write_text(json.dumps([f"{style} 1", f"{style} 2"]))
    prompts = load_prompts("hpsv2", set_path=str(hpd))
    assert prompts[:3] == ["anime 1", "anime 2", "concept-art 1"] and len(prompts) == 8
    (hpd / "benchmark" / "photo.json").unlink()
    with pytest.raises(FileNotFoundError, match="--prompt_set_path: .* lacks .*photo.json"):
        load_prompts("hpsv2", set_path=str(hpd))
    assert NAMED_SETS["parti"].repo == "nateraw/parti-prompts" and NAMED_SETS["hpsv2"].repo == "zhwang/HPDv2"


def test_named_sets_resolve_to_their_hub_files(tmp_path, monkeypatch):
    """Without a local copy the named sets are read from the Hub: HPSv2's four JSON files of the
    dataset repository, PartiPrompts' train split (the Hub is faked here: no network)."""
    import datasets
    import huggingface_hub

    asked = []

    def download(repo, filename, repo_type=None, cache_dir=None):
        asked.append((repo, filename, repo_type))
        file = tmp_path / filename.replace("/", "_")
        file.write_text(json.dumps([filename]))
        return str(file)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert load_prompts("hpsv2")[0] == "benchmark/anime.json"
    assert asked == [
        ("zhwang/HPDv2", f"benchmark/{s}.json", "dataset") for s in ("anime", "concept-art", "paintings", "photo")
    ]

    def load_dataset(name, split=None, cache_dir=None):
        asked.append((name, split))
        return datasets.Dataset.from_dict({"Prompt": ["p1", "p2"]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert load_prompts("parti") == ["p1", "p2"] and asked[-1] == ("nateraw/parti-prompts", "train")
