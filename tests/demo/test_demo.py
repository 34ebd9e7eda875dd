"""The toy preference world (``fastpref.demo.world``) and the ``fastpref demo`` study
(``fastpref.demo.study`` and the modules it runs): determinism, the reward on hand-built images, the AUROC against a
brute-force count, the labels, and one ``--quick`` run end to end (shape and finiteness of
``results.json``)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="the toy world needs the train extra (diffusers)")
pytest.importorskip("accelerate", reason="the trainer needs the train extra (accelerate)")

from fastpref import stats  # noqa: E402
from fastpref.demo import config, labels, runs, study, summary, tables  # noqa: E402
from fastpref.demo import world as tw  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """The toy world's ops are tiny: one thread (as ``fastpref demo`` uses) is faster than two,
    and much faster on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = tw.WorldConfig(pretrain_steps=3, pretrain_batch=8, num_pairs=8, sample_steps=2, eval_samples=1)


def _prompt(colour: str, row: int, column: int) -> int:
    return tw.colour_names().index(colour) * tw.NUM_POSITIONS + row * 3 + column


def _image(config, colour_rgb, top, left, level=1.0) -> torch.Tensor:
    """A square of ``colour_rgb`` (in [0, 1]) at ``(top, left)`` on black, in [-1, 1]."""
    unit = torch.zeros(3, config.image_size, config.image_size)
    for c in range(3):
        unit[c, top : top + config.blob_size, left : left + config.blob_size] = colour_rgb[c] * level
    return unit * 2 - 1


# ----------------------------------------------------------------------------------------------
# the world
# ----------------------------------------------------------------------------------------------


def test_reward_on_hand_built_images():
    config = tw.WorldConfig()
    red = (1.0, 0.0, 0.0)
    p = _prompt("red", 1, 1)  # middle centre: top-left corner (2, 2)
    cases = {
        "exact": (_image(config, red, 2, 2), 1.0),
        "neighbour colour (yellow)": (_image(config, (1.0, 1.0, 0.0), 2, 2), 0.5),
        "shifted one pixel": (_image(config, red, 3, 2), 1 - 0.5 * (4 / 16 + 4 / 48)),
        "shifted two pixels": (_image(config, red, 2, 4), 1 - 0.5 * (8 / 16 + 8 / 48)),
        "half brightness": (_image(config, red, 2, 2, level=0.5), 0.75),
        "black": (-torch.ones(3, 8, 8), 0.5),
        "white": (torch.ones(3, 8, 8), 0.0),
        "wrong place entirely": (_image(config, red, 0, 0), 1 - 0.5 * (12 / 16 + 12 / 48)),
    }
    images = torch.stack([img for img, _ in cases.values()])
    got = tw.reward(images, torch.full((len(cases),), p), config)
    for (name, (_, want)), value in zip(cases.items(), got.tolist()):
        assert value == pytest.approx(want, abs=1e-6), name
    # values outside [-1, 1] are clipped before the comparison
    assert tw.reward(_image(config, red, 2, 2)[None] * 3, torch.tensor([p]), config).item() == pytest.approx(1.0)
    # the template of every prompt scores 1
    ids = torch.arange(tw.NUM_PROMPTS)
    target, _ = tw.templates(ids, config)
    assert torch.allclose(tw.reward(target * 2 - 1, ids, config), torch.ones(tw.NUM_PROMPTS))


def test_prompts_split_and_embeddings():
    config = tw.WorldConfig(seed=3)
    train, held = tw.split_prompts(config)
    assert len(held) == tw.NUM_POSITIONS and len(train) + len(held) == tw.NUM_PROMPTS
    assert set(train.tolist()).isdisjoint(held.tolist())
    assert sorted(tw.prompt_position(held).tolist()) == list(range(tw.NUM_POSITIONS))  # one per position
    assert set(tw.prompt_colour(held).tolist()) == set(range(tw.NUM_COLOURS))  # every colour evaluated
    assert set(tw.prompt_colour(train).tolist()) == set(range(tw.NUM_COLOURS))
    assert tw.prompt_text(_prompt("blue", 0, 2)) == "blue square, top right"
    table = tw.embedding_table(config)
    assert table.shape == (tw.NUM_PROMPTS, 2, config.embed_dim) and table.dtype == torch.float32
    assert torch.equal(table, tw.embedding_table(tw.WorldConfig(seed=3)))
    assert not torch.equal(table, tw.embedding_table(tw.WorldConfig(seed=4)))
    assert torch.equal(tw.split_prompts(config)[1], held)


def test_base_images_deterministic_and_mixed():
    config = tw.WorldConfig()
    prompts = torch.arange(tw.NUM_PROMPTS).repeat(20)
    a, kind_a = tw.draw_base_images(prompts, config, torch.Generator().manual_seed(1))
    b, kind_b = tw.draw_base_images(prompts, config, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and torch.equal(kind_a, kind_b)
    assert a.shape == (len(prompts), 3, 8, 8) and a.dtype == torch.float32
    r = tw.reward(a, prompts, config)
    exact = kind_a == tw.BASE_KINDS.index("exact")
    for k in range(1, len(tw.BASE_KINDS)):  # every partial kind scores below the exact images
        assert r[kind_a == k].mean() < r[exact].mean() - 0.1, tw.BASE_KINDS[k]
    shares = torch.bincount(kind_a, minlength=len(tw.BASE_KINDS)).float() / len(prompts)
    assert torch.allclose(shares, torch.tensor(config.base_mix), atol=0.05)


def test_world_is_deterministic_for_a_seed_and_cached(tmp_path):
    first = tw.load_or_build(TINY, tmp_path / "a")
    second = tw.load_or_build(TINY, tmp_path / "b")
    assert first.path.name == f"world-{TINY.key()}"
    for key in first.base_state:
        assert torch.equal(first.base_state[key], second.base_state[key]), key
    for key in ("latents", "prompt", "reward"):
        assert torch.equal(first.pairs[key], second.pairs[key]), key
    assert first.base_reward == second.base_reward
    pairs = first.pairs
    assert pairs["latents"].shape == (TINY.num_pairs, 2, 3, 8, 8)
    assert (pairs["reward"][:, 0] >= pairs["reward"][:, 1]).all()  # stored winner first
    train, _ = tw.split_prompts(TINY)
    assert set(pairs["prompt"].tolist()) <= set(train.tolist())
    # the cache is read back as built
    again = tw.load_or_build(TINY, tmp_path / "a", progress=lambda *a: pytest.fail("rebuilt a cached world"))
    assert torch.equal(again.pairs["latents"], pairs["latents"])
    # another seed is another world
    other = tw.load_or_build(tw.WorldConfig(**{**TINY.to_dict(), "seed": 1}), tmp_path / "a")
    assert other.path != first.path
    assert not torch.equal(other.pairs["latents"], pairs["latents"])


def test_labels():
    mask = labels.flip_mask(1000, 0.2, seed=5)
    assert mask.dtype == torch.bool and int(mask.sum()) == 200
    assert torch.equal(mask, labels.flip_mask(1000, 0.2, seed=5))
    assert not torch.equal(mask, labels.flip_mask(1000, 0.2, seed=6))
    assert int(labels.flip_mask(1000, 0.0, seed=5).sum()) == 0
    config = tw.WorldConfig()
    prompts = torch.arange(tw.NUM_PROMPTS)
    pairs = {
        "prompt": prompts,
        "reward": torch.stack([torch.full((tw.NUM_PROMPTS,), 0.9), torch.full((tw.NUM_PROMPTS,), 0.5)], 1),
    }
    judge, biased = labels.synthetic_judge(pairs, config, noise=0.0)
    assert torch.equal(
        biased,
        (tw.prompt_colour(prompts) == tw.colour_names().index("blue"))
        | (tw.prompt_colour(prompts) == tw.colour_names().index("magenta")),
    )
    assert (judge[~biased] > 0.5).all() and (judge[biased] < 0.5).all()


def test_dedpo_run_data_is_relative_to_the_presented_order(tmp_path):
    world = tw.load_or_build(TINY, tmp_path)
    study = config.StudyConfig(world=TINY)
    data = runs.run_data(world, runs.RunSpec("dedpo", "dedpo", 0, 0, 1, variant="0.5"), study)
    judge, _ = labels.synthetic_judge(world.pairs, TINY, biased_colours=study.judge_biased_colours, seed=0)
    assert torch.equal(data["swap"], judge < 0.5)
    assert (data["synthetic_label"] >= 0.5).all()  # the judge's preferred image is presented first
    human = data["human_mask"]
    assert int(human.sum()) == 4 and torch.isnan(data["human_label"][~human]).all()
    assert torch.equal(
        data["human_label"][human], (~data["swap"][human]).float()
    )  # 1 = presented first is the reward's winner
    assert torch.allclose(data["propensity"], torch.full((TINY.num_pairs,), 0.5))
    only = runs.run_data(world, runs.RunSpec("dedpo", "human-only", 0, 0, 1, variant="0.5"), study)
    assert torch.equal(only["indices"], torch.nonzero(human).flatten()) and not only["swap"].any()
    # the debiased labels: the judge's where no human looked, yhat + (y - yhat) / p where one did
    debiased = runs.debiased_labels(data)
    yhat = data["synthetic_label"]
    assert torch.equal(debiased[~human], yhat[~human])
    assert torch.allclose(debiased[human], yhat[human] + (data["human_label"][human] - yhat[human]) / 0.5)


def test_curve_points_do_not_change_the_run(tmp_path):
    """A learning-curve run (evaluations and diagnostics every few steps) trains exactly as a
    plain run: its table evaluation matches, and the curve has a point per window."""
    world = tw.load_or_build(TINY, tmp_path)
    study = config.StudyConfig(world=TINY, seeds=1, steps=2, batch_pairs=4, curve_steps=4, curve_every=2)
    plain = runs.train_run(world, runs.RunSpec("flip", "adaptive", 50, 0, 2, table_step=2), study)
    curve = runs.train_run(world, runs.RunSpec("flip", "adaptive", 50, 0, 4, table_step=2, curve=True), study)
    assert curve["reward"] == plain["reward"]
    for key in runs.PER_PAIR:
        assert np.array_equal(curve[key], plain[key]), key
    assert [p["step"] for p in curve["curve"]] == [0, 2, 4]
    point = curve["curve"][-1]
    assert 0.0 <= point["implicit_acc_kept"] <= 1.0 and 0.0 <= point["auroc_u_flipped"] <= 1.0
    assert point["l_rms"] > 0.0 and 0.0 < point["weight_kept"] <= 1.0
    assert 0.0 <= point["auroc_confidence_flipped"] <= 1.0 and 0.0 <= point["grad_share_flipped"] <= 1.0


def test_oracle_trains_on_dpo_order_without_the_flipped_pairs(tmp_path):
    """The oracle's pairs are DPO's, in DPO's order, with the flipped ones skipped; its record
    never holds a flipped pair; its gradient scale is DPO's sigmoid(-beta l)."""
    world = tw.load_or_build(TINY, tmp_path)
    study = config.StudyConfig(world=TINY, seeds=1, steps=2, batch_pairs=4)
    dpo = runs.run_data(world, runs.RunSpec("flip", "dpo", 50, 3, 2), study)
    oracle = runs.run_data(world, runs.RunSpec("flip", "oracle", 50, 3, 2), study)
    assert torch.equal(dpo["swap"], oracle["swap"]) and torch.equal(oracle["keep"], ~dpo["swap"])
    dpo_order, oracle_order = runs.pair_order(dpo, 3), runs.pair_order(oracle, 3)
    expected = [i for i in itertools.islice(dpo_order, 40) if not dpo["swap"][i]]
    assert list(itertools.islice(oracle_order, len(expected))) == expected
    record = runs.train_run(world, runs.RunSpec("flip", "oracle", 50, 3, 2, table_step=2), study)
    assert len(record["seen_flipped"]) == 8 and not record["seen_flipped"].any() and record["u"] is None
    beta = study.beta
    assert np.allclose(record["grad_scale"], 1.0 / (1.0 + np.exp(beta * record["l_theta"].astype(np.float64))))


# ----------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------


def _auroc_brute_force(scores, positive) -> float:
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(6))
def test_auroc_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 60))
    scores = np.round(rng.normal(size=n), int(rng.integers(0, 2)))  # coarse rounding: many ties
    positive = rng.random(n) < 0.3
    positive[0], positive[1] = True, False
    assert stats.auroc(scores, positive) == pytest.approx(_auroc_brute_force(scores, positive), abs=1e-12)


def test_auroc_edges():
    assert stats.auroc([0.1, 0.2, 0.9, 0.8], [False, False, True, True]) == 1.0
    assert stats.auroc([0.1, 0.2, 0.9, 0.8], [True, True, False, False]) == 0.0
    assert stats.auroc([0.5] * 4, [True, False, True, False]) == 0.5
    with pytest.raises(ValueError):
        stats.auroc([0.1, 0.2], [True, True])
    assert stats.average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_t_quantile_and_intervals():
    # textbook values of Student's t (two-sided 95 %: the 0.975 quantile)
    for df, want in ((1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423), (1000, 1.9623)):
        assert stats.t_quantile(0.975, df) == pytest.approx(want, abs=1e-4), df
    assert stats.t_quantile(0.025, 4) == pytest.approx(-stats.t_quantile(0.975, 4))
    assert stats.t_quantile(0.5, 3) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError):
        stats.t_quantile(1.0, 3)
    interval = stats.mean_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.7764 * math.sqrt(2.5) / math.sqrt(5)
    assert interval["mean"] == 3.0 and interval["low"] == pytest.approx(3 - half, abs=1e-3)
    assert stats.mean_interval([1.0])["low"] is None
    up = stats.paired_difference([1.2, 1.21, 1.22], [1.0, 1.0, 1.0])
    assert up["differences"] == pytest.approx([0.2, 0.21, 0.22])
    assert up["excludes_zero"] and up["low"] > 0
    flat = stats.paired_difference([1.1, 0.9, 1.0], [1.0, 1.0, 1.0])
    assert flat["excludes_zero"] is False
    assert "better" in tables.conclusion("A − B", up) and "no detectable" in tables.conclusion("A − B", flat)
    with pytest.raises(ValueError):
        stats.paired_difference([1.0, 2.0], [1.0])


def test_budget_is_the_peak_of_dpo_at_zero_flips():
    def run(method, rate, rewards):
        curve = [{"step": 10 * i, "reward": r} for i, r in enumerate(rewards)]
        return {"study": "flip", "method": method, "rate": rate, "curve": curve}

    records = [
        run("dpo", 0, [0.4, 0.5, 0.7, 0.6]),
        run("dpo", 0, [0.4, 0.6, 0.65, 0.5]),
        run("adaptive", 0, [0.4, 0.9, 0.1, 0.1]),  # other arms never choose it
        run("dpo", 20, [0.4, 0.9, 0.1, 0.1]),
    ]
    budget = summary.choose_budget(records)
    assert budget["steps"] == 20 and budget["curve"]["mean"][2] == pytest.approx(0.675)
    records[0]["curve"][3]["reward"] = 0.95
    assert summary.choose_budget(records)["steps"] == 30
    # step 0 (the base model) is never the budget
    assert summary.choose_budget([run("dpo", 0, [0.9, 0.5, 0.4])])["steps"] == 10


def test_ratio_interval_fieller():
    """With a constant denominator Fieller's interval is the paired t-interval of the numerator
    divided by it; a denominator that is not distinguishable from zero gives an unbounded set."""
    a = np.array([0.01, 0.03, -0.02, 0.04, 0.02])
    r = stats.ratio_interval(a, np.full(5, 0.05))
    t = stats.mean_interval(a)
    assert r["bounded"] and r["mean"] == pytest.approx(t["mean"] / 0.05)
    assert r["low"] == pytest.approx(t["low"] / 0.05) and r["high"] == pytest.approx(t["high"] / 0.05)
    loose = stats.ratio_interval(a, np.array([0.05, -0.04, 0.06, -0.05, 0.01]))
    assert not loose["bounded"] and loose["low"] is None and loose["mean"] == pytest.approx(a.mean() / 0.006)
    with pytest.raises(ValueError, match="same seeds"):
        stats.ratio_interval(a, a[:3])


def test_paper_figures_match_its_tables():
    """The paper's own flip figures (Tab. 1-3, SD 1.5, Pick-a-Pic Valid): at 20 % flips DPO keeps
    48-54 % of its clean gain (IR: 0.00 vs 0.16 over -0.15, "52 %" lost, as its Sec. 1 says) and
    Adaptive-DPO's flip-specific advantage is 22-47 % of clean DPO's gain."""
    from fastpref.demo import paper

    at20 = paper.flip_figures()["20"]
    low, high = at20["range"]["dpo_keeps_share_of_clean_gain"]
    assert round(100 * low) == 48 and round(100 * high) == 54
    assert round(100 * (1 - at20["by_metric"]["IR"]["dpo_keeps_share_of_clean_gain"])) == 52
    low, high = at20["range"]["adaptive_flip_specific_advantage"]
    assert round(100 * low) == 22 and round(100 * high) == 47


def test_flipped_ratio_per_bin():
    u = np.array([0.0, 0.1, 0.2, 0.5, 0.6, 0.99, 1.0])
    flipped = np.array([0, 0, 1, 0, 1, 1, 1], dtype=bool)
    counts, ratios = stats.flipped_ratio_per_bin(u, flipped, np.array([0.0, 0.5, 1.0]))
    assert counts == [3, 4]  # the last bin is closed
    assert ratios == pytest.approx([1 / 3, 3 / 4])
    counts, ratios = stats.flipped_ratio_per_bin(u, flipped, np.array([0.0, 0.05, 2.0, 3.0]))
    assert counts == [1, 6, 0] and ratios[2] is None


# ----------------------------------------------------------------------------------------------
# the study, end to end
# ----------------------------------------------------------------------------------------------


def _numbers(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, obj


SMALL = config.StudyConfig(
    world=tw.WorldConfig(pretrain_steps=3, pretrain_batch=8, num_pairs=16, sample_steps=2, eval_samples=1),
    seeds=2,
    extra_seeds=1,
    steps=2,
    batch_pairs=4,
    curve_steps=4,
    curve_every=2,
    curve_eval_samples=1,
)


def _check_results(results: dict, study_config: config.StudyConfig, rates) -> None:
    """The keys every results.json keeps, the paired differences, and finiteness."""
    assert results["flip_rates"] == list(rates)
    assert results["seeds"] == study_config.seeds and isinstance(results["base_reward"], float)
    for key in ("reward", "reward_std", "gain", "reward_interval95"):
        assert set(results[key]) == set(config.METHODS), key
        for method in config.METHODS:
            assert set(results[key][method]) == {str(r) for r in rates}, (key, method)
    for method in config.METHODS[1:]:
        for rate in rates:
            paired = results["paired_vs_dpo"][method][str(rate)]
            assert len(paired["differences"]) == study_config.seeds
            assert paired["low"] <= paired["mean"] <= paired["high"]
            assert paired["mean"] == pytest.approx(
                results["reward"][method][str(rate)] - results["reward"]["dpo"][str(rate)], abs=1e-12
            )
    assert set(results["auroc_u_flipped"]) == {str(r) for r in rates if r > 0}
    assert all(0.0 <= v <= 1.0 for v in results["auroc_u_flipped"].values())
    for key in ("machine", "libraries", "wall_seconds", "hyperparameters"):
        assert key in results, key
    assert results["machine"]["cpu"] and results["libraries"]["torch"] == torch.__version__
    for path, value in _numbers(results):
        assert math.isfinite(value), path


@pytest.mark.timeout(300)
def test_demo_quick_end_to_end(tmp_path, capsys):
    """``fastpref demo --quick``: the core study (the headline table with paired intervals and
    its plots) at CI size, through the command line."""
    out = tmp_path / "demo"
    assert study.main(["--quick", "--output_dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    quick = config.quick_config()
    _check_results(results, quick, config.FLIP_RATES)
    assert results["steps"] == quick.steps and "budget" not in results and "curves" not in results
    text = (out / "results.md").read_text()
    sentences = 2 * len(config.FLIP_RATES) + sum(r > 0 for r in config.FLIP_RATES)  # the oracle at rates > 0
    assert text.count("| DPO | 0 |") == 1 and text.count("the 95 % interval") == sentences
    for caption in ("Share of the oracle's gain", "What explains it", "The toy beside the paper"):
        assert caption in text, caption
    assert set(results["diagnostics"]["20"]) == set(config.METHODS)
    assert set(results["oracle_share"]) == set(config.REAL_METHODS)
    assert sorted(results["plots"]) == ["flipped_ratio_vs_u.png", "paired.png", "reward_vs_flip.png"]
    for name in results["plots"]:
        assert (out / name).stat().st_size > 1000, name
    assert "Label-flip rate (%)" in capsys.readouterr().out


@pytest.mark.timeout(300)
def test_demo_full_study_end_to_end(tmp_path):
    """The ``--full`` study on a tiny world: the budget from DPO's curves, then every part; a
    second call reads every run back from the record cache and writes the same results."""
    world = study.build_world(SMALL, tmp_path)
    first = study.run_study(world, SMALL, tmp_path, 1, True, True, 0.0)
    _check_results(first, SMALL, config.FLIP_RATES)
    assert first["steps"] == first["budget"]["steps"] and 0 < first["steps"] <= SMALL.curve_steps
    arms = [(method, str(rate)) for method in config.METHODS for rate in config.FLIP_RATES]
    assert sorted((m, r) for m in first["curves"] for r in first["curves"][m]) == sorted(arms)
    for method, rate in arms:
        curve = first["curves"][method][rate]
        assert curve["reward"]["step"] == list(range(0, SMALL.curve_steps + 1, SMALL.curve_every))
        assert set(curve) == set(summary.CURVE_KEYS)
    assert set(first["ablation"]["arms"]) == {config.ABLATION_DEFAULT, *config.ABLATIONS}
    assert set(first["dedpo"]["by_propensity"]) == {f"{p:g}" for p in SMALL.propensities}
    text = (tmp_path / "results.md").read_text()
    sentences = 2 * len(config.FLIP_RATES) + sum(r > 0 for r in config.FLIP_RATES)
    assert "Ablation (not used for the headline" in text and text.count("the 95 % interval") == sentences
    assert sorted(first["plots"]) == sorted(
        [
            "reward_vs_flip.png",
            "paired.png",
            "flipped_ratio_vs_u.png",
            "curves.png",
            "diagnostics.png",
            "dedpo.png",
        ]
    )
    again = study.run_study(world, SMALL, tmp_path, 1, True, True, 0.0)
    for key in ("reward", "paired_vs_dpo", "oracle_share", "diagnostics", "curves", "ablation", "dedpo", "budget"):
        assert again[key] == first[key], key
    assert again["run_seconds_total"] == first["run_seconds_total"]  # every record read back, none rerun


def test_demo_output_dir_must_be_writable(tmp_path, capsys):
    """``--output_dir`` that is a file, or inside one, stops with argparse's message (exit 2),
    not a traceback, before the world is built."""
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for output_dir, message in (
        (a_file, f"{a_file} is a file, not a folder"),
        (a_file / "out", f"cannot write in {a_file / 'out'} (Not a directory)"),
    ):
        with pytest.raises(SystemExit) as exit_:
            study.main(["--quick", "--output_dir", str(output_dir)])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and f"fastpref demo: error: --output_dir: {message}" in err
        assert "Traceback" not in err
