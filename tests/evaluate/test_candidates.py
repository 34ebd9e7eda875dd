"""The compared models: what each trained-output folder is, their names, and the errors; and the
shards of (prompt, seed) items the processes split."""

import pytest

from fastpref.evaluate.candidates import candidates
from fastpref.evaluate.generation import items, shard


def test_kinds_and_names_of_trained_outputs(tmp_path):
    (tmp_path / "run" / "checkpoint-20").mkdir(parents=True)
    (tmp_path / "run" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    (tmp_path / "run" / "checkpoint-20" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    (tmp_path / "full" / "unet").mkdir(parents=True)
    (tmp_path / "full" / "unet" / "config.json").write_text("{}")
    (tmp_path / "full" / "checkpoint-5").mkdir()
    (tmp_path / "full" / "checkpoint-5" / "model.safetensors").write_bytes(b"")
    specs = [str(tmp_path / "run"), str(tmp_path / "run" / "checkpoint-20"), f"ft={tmp_path / 'full'}"]
    found = candidates([*specs, str(tmp_path / "full" / "checkpoint-5")])
    assert [(c.name, c.kind) for c in found] == [
        ("base", "base"),
        ("run", "lora"),
        ("run-checkpoint-20", "lora"),
        ("ft", "full"),
        ("full-checkpoint-5", "full-checkpoint"),
    ]


def test_bad_trained_outputs_name_the_flag(tmp_path):
    with pytest.raises(ValueError, match="--models: .* is not a folder"):
        candidates([str(tmp_path / "missing")])
    with pytest.raises(ValueError, match="--models: .* holds no trained weights"):
        candidates([str(tmp_path)])
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="--models: two models are called 'base'"):
        candidates([f"base={tmp_path}"])
    with pytest.raises(ValueError, match="--models: name 'a b' must be"):
        candidates([f"a b={tmp_path}"])


def test_shards_cover_every_item_once_with_the_same_seeds_per_prompt():
    work = items(["p", "q", "r"], [0, 7])
    assert work[:2] == [(0, "p", 0), (0, "p", 7)]
    shards = [shard(work, rank, 4) for rank in range(4)]
    assert sorted(item for part in shards for item in part) == sorted(work) and sum(map(len, shards)) == len(work)
