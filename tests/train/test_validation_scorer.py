"""``--validation_scorer``: a tiny SD 1.5 run whose validation images are scored by a tiny
PickScore (the real one's folder layout and classes) logs their mean to TensorBoard as
``validation/pickscore``, equal to the scorer's own score of the saved images; bad flags stop at
start-up, naming the flag."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")
pytest.importorskip("tensorboard")

PROMPTS = ["a red circle on a blue background", "a green square"]


@pytest.fixture(scope="module")
def pickscore(tmp_path_factory):
    """``pickscore.ROLE=FOLDER`` values of the tiny PickScore."""
    from fastpref.testing.tiny_scorers import make_tiny_scorers

    weights = make_tiny_scorers(tmp_path_factory.mktemp("scorers"))
    return [f"{key}={value}" for key, value in weights.items() if key.startswith("pickscore.")]


def scalars(logs, tag):
    """``{step: value}`` of the scalar ``tag`` in the TensorBoard events under ``logs``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = {}
    for events in logs.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            found.update({event.step: event.value for event in accumulator.Scalars(tag)})
    return found


def test_the_validation_score_is_logged_and_is_the_scorers_score_of_the_saved_images(
    train_main, tmp_path, pickscore, caplog
):
    from PIL import Image

    from fastpref.scorers import make_scorer
    from fastpref.scorers.flags import parse_weights

    out = tmp_path / "out"
    flags = ["--max_train_steps", "2", "--run_validation", "--validation_steps", "1", "--validation_inference_steps"]
    flags += ["1", "--validation_prompts", *PROMPTS, "--report_to", "tensorboard", "--validation_scorer", "pickscore"]
    with caplog.at_level("INFO", logger="fastpref.train"):
        code, err = train_main(out, *flags, "--scorer_weights", *pickscore)
    assert code == 0, err
    logged = scalars(out / "logs", "validation/pickscore")
    assert sorted(logged) == [1, 2]
    scorer = make_scorer("pickscore", parse_weights(pickscore)["pickscore"])
    for step, value in logged.items():
        files = sorted((out / "validation" / f"step-{step}").glob("*.png"))
        images = [Image.open(file).convert("RGB") for file in files]
        assert len(images) == len(PROMPTS)
        want = float(scorer.score(images, PROMPTS).mean())
        assert value == pytest.approx(want, rel=1e-5, abs=1e-5)
        (in_log,) = re.findall(rf"validation at step {step}: pickscore (\S+) \(mean of 2 images\)", caplog.text)
        assert float(in_log) == pytest.approx(want, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--validation_scorer", "pick"], "--validation_scorer: unknown metric 'pick'; choices: pickscore, hpsv2"),
        (["--validation_scorer", "hpsv2"], "--validation_scorer: the hpsv2 scorer needs open_clip: pip install"),
        (["--validation_scorer", "clip"], "--validation_scorer: scores the validation images; add --run_validation"),
        (["--scorer_weights", "pickscore=/x"], "--scorer_weights: expected NAME.ROLE=PATH, got 'pickscore=/x'"),
        (["--scorer_weights", "clip.mlp=/x"], "--scorer_weights: clip has no weights mlp; its weights: clip.model"),
        (["--scorer_weights", "clip.model=/no/such"], "--scorer_weights: clip.model: no such file or folder /no/such"),
    ],
)
def test_a_bad_scorer_flag_stops_at_start_up_naming_it(train_main, tmp_path, monkeypatch, extra, message):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "open_clip" else real(name, *a))
    run_validation = [] if extra[1] == "clip" else ["--run_validation"]
    code, err = train_main(tmp_path / "out", *run_validation, *extra)
    assert code == 2 and f"fastpref train: error: {message}" in err
    assert not (tmp_path / "out").exists()


def test_a_resume_may_add_or_change_the_validation_scorer(tiny_run, tmp_path, pickscore):
    from offline import tiny_args

    from fastpref.train import checks
    from fastpref.train.arguments import build_parser, parse_args
    from fastpref.train.run import resolve

    def recorded(*extra):
        plan = resolve(*parse_args(tiny_args(tiny_run, tmp_path / "out", *extra), build_parser()))
        return checks.recorded_settings(plan.data, plan.config, plan.run, 1)

    before = recorded()
    after = recorded("--run_validation", "--validation_scorer", "pickscore", "--scorer_weights", *pickscore)
    refused, changed = checks.resume_differences(before, after)
    assert refused == [] and {line.split()[0] for line in changed} >= {"--validation_scorer", "--scorer_weights"}
