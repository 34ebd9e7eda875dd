"""``fastpref eval`` end to end on the tiny SD 1.5 pipeline and the tiny scorers: a LoRA trained
by ``fastpref train`` against the base (the README's command), pairing (a model identical to the
base makes the same images on the same seeds), resume after SIGKILL, reuse of the base's images,
and the errors."""

import contextlib
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastpref import cli
from fastpref.evaluate.generation import FAULT_ENV
from fastpref.testing import tiny_scorers

ROOT = Path(__file__).resolve().parents[2]
QUICK = ["--resolution", "32", "--num_inference_steps", "1", "--batch_size", "8", "--no_progress"]


def readme_commands():
    """The commands of the README's Evaluation block, continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("## Evaluation: `fastpref eval`") :].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def run_readme_command(line: str, tmp: Path):
    """One README command in this process, ``/tmp/`` under ``tmp``: ``.venv/bin/fastpref`` through
    ``fastpref.cli.main``, ``python -m fastpref.testing.tiny_scorers``, ``printf ... > file`` and
    ``$(cat file)``."""
    line = line.replace("/tmp/", f"{tmp}/")
    if "$(cat " in line:
        head, rest = line.split("$(cat ", 1)
        file, tail = rest.split(")", 1)
        line = head + Path(file).read_text().strip() + tail
    words = shlex.split(line)
    if words[0] == "printf":
        assert words[1] == "%s\\n" and words[-2] == ">"
        Path(words[-1]).write_text("".join(f"{w}\n" for w in words[2:-2]))
    elif words[0] == ".venv/bin/fastpref":
        assert cli.main(words[1:]) == 0, line
    else:
        assert words[:3] == [".venv/bin/python", "-m", "fastpref.testing.tiny_scorers"], line
        assert tiny_scorers.main(words[3:]) == 0


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    """The README's Evaluation block, run: a 2-step LoRA of the tiny SD 1.5 (``fastpref train``),
    the tiny scorers and ``fastpref eval`` of base vs the LoRA on 8 prompts; plus a full
    fine-tune folder that holds the base's UNet. ``(tmp, printed eval output)``."""
    tmp = tmp_path_factory.mktemp("readme")
    printed = io.StringIO()  # capsys is per test: the module's run captures by hand
    with contextlib.redirect_stdout(printed):
        for line in readme_commands():
            run_readme_command(line, tmp)
    shutil.copytree(tmp / "tiny-sd15" / "unet", tmp / "same" / "unet")
    return tmp, printed.getvalue()


@pytest.fixture(scope="module")
def setup(readme_run):
    tmp, _ = readme_run
    weights = (tmp / "tiny-scorers" / tiny_scorers.WEIGHTS_FILE).read_text().split()
    return {
        "root": tmp,
        "base": ["--pretrained_model_name_or_path", str(tmp / "tiny-sd15")],
        "lora": str(tmp / "lora-run"),
        "same": str(tmp / "same"),
        "weights": ["--scorer_weights", *weights],
        "prompts": ["--prompts", str(tmp / "prompts.txt")],
    }


def eval_args(setup, out, *extra):
    return ["eval", *setup["base"], *setup["prompts"], "--output_dir", str(out), *QUICK, *setup["weights"], *extra]


def png(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_train_then_eval_base_vs_lora_on_8_prompts(readme_run):
    tmp, printed = readme_run
    out = tmp / "eval"
    results = json.loads((out / "eval.json").read_text())
    assert (results["num_prompts"], results["num_seeds"]) == (8, 1)
    assert [m["name"] for m in results["models"]] == ["base", "lora-run"]
    assert results["models"][1]["kind"] == "lora"
    assert set(results["metrics"]) == {"pickscore", "aesthetic", "clip"}
    for entry in results["metrics"].values():
        lora = entry["models"]["lora-run"]
        assert lora["difference"]["n"] == 8 and 0.0 <= lora["win_rate"]["mean"] <= 1.0
        scores = np.array(entry["scores"]["lora-run"]) - np.array(entry["scores"]["base"])
        assert lora["difference"]["mean"] == pytest.approx(scores.mean())
    assert (out / "eval.md").read_text() in printed
    assert "8 prompts x 1 seeds" in printed
    # The LoRA changed the images (the scores differ), on the same seeds.
    assert any(
        np.any(png(f) != png(out / "images" / "lora-run" / f.name)) for f in (out / "images" / "base").glob("*.png")
    )
    # The grid: a label band, then 3 rows of (base, lora) at 32 px.
    with Image.open(out / "grids" / "base-vs-lora-run.png") as grid:
        assert grid.size == (64, 14 + 3 * 32)
        assert np.array_equal(
            np.asarray(grid.convert("RGB"))[14:46, :32], png(sorted((out / "images" / "base").glob("*.png"))[0])
        )
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["aesthetic.png", "clip.png", "pickscore.png"]


def test_pairing_same_weights_same_seeds_same_images_and_base_images_reused(setup, capsys):
    out = setup["root"] / "eval"  # the README run's: the base images are there
    before = {f.name: f.stat().st_mtime_ns for f in (out / "images" / "base").glob("*.png")}
    assert len(before) == 8
    args = eval_args(setup, out, "--models", f"same={setup['same']}", "--metrics", "pickscore", "--max_prompts", "4")
    assert cli.main(args) == 0
    assert {f.name: f.stat().st_mtime_ns for f in (out / "images" / "base").glob("*.png")} == before
    results = json.loads((out / "eval.json").read_text())
    same = results["metrics"]["pickscore"]["models"]["same"]
    assert len(list((out / "images" / "same").glob("*.png"))) == 4
    for file in (out / "images" / "same").glob("*.png"):
        assert np.array_equal(png(file), png(out / "images" / "base" / file.name))
    assert same["difference"]["mean"] == 0.0 and same["win_rate"]["mean"] == 0.5  # every pair a tie


def test_resume_after_sigkill(setup, tmp_path):
    out = tmp_path / "out"
    args = eval_args(setup, out, "--max_prompts", "2", "--seeds", "0", "1", "--batch_size", "1", "--metrics", "clip")
    env = {**os.environ, FAULT_ENV: "2", "HF_HUB_OFFLINE": "1"}  # SIGKILL after 2 images
    killed = subprocess.run([sys.executable, "-m", "fastpref.cli", *args], cwd=ROOT, env=env, capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    made = {f.name: f.stat().st_mtime_ns for f in (out / "images" / "base").glob("*.png")}
    assert len(made) == 2 and not (out / "eval.json").exists()
    assert cli.main(args) == 0
    files = sorted((out / "images" / "base").glob("*.png"))
    assert len(files) == 4 and {f.name: f.stat().st_mtime_ns for f in files if f.name in made} == made
    assert [f.name for f in (out / "images" / "base").iterdir() if f.name.startswith(".")] == []
    # The images are those of an uninterrupted run (the 8-prompt run's first two prompts, seed 0).
    for file in files:
        if file.name.endswith("seed0.png"):
            assert (
                np.abs(png(file).astype(int) - png(setup["root"] / "eval" / "images" / "base" / file.name)).max() <= 1
            )
    results = json.loads((out / "eval.json").read_text())
    assert (results["num_prompts"], results["num_seeds"]) == (2, 2)


def test_other_settings_in_the_same_output_dir_are_refused(setup, capsys):
    out = setup["root"] / "eval"
    assert cli.main(eval_args(setup, out, "--num_inference_steps", "2", "--metrics", "clip")) == 2
    err = capsys.readouterr().err
    assert "--output_dir:" in err and "num_inference_steps: 1 then, 2 now" in err


def test_unknown_metric_missing_extra_and_bad_models_are_clear_errors(setup, capsys, monkeypatch):
    out = setup["root"] / "errors"
    with pytest.raises(SystemExit) as exit_:
        cli.main(eval_args(setup, out, "--metrics", "pickscor"))
    assert exit_.value.code == 2
    assert (
        "--metrics: unknown metric 'pickscor'; choices: pickscore, hpsv2, imagereward, aesthetic, clip"
        in capsys.readouterr().err
    )
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "open_clip" else real(name, *a))
    assert cli.main(eval_args(setup, out, "--metrics", "hpsv2")) == 2
    assert "the hpsv2 scorer needs open_clip: pip install 'fastpref[hpsv2]'" in capsys.readouterr().err
    assert cli.main(eval_args(setup, out, "--models", str(out))) == 2
    assert "--models:" in capsys.readouterr().err
    assert not (out / "images").exists()  # nothing was generated before the checks
