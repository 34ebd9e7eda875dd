"""Smoke test of ``benchmarks/bench_step.py``: its ``main`` on a tiny quick configuration writes
a JSON report of the expected shape whose timings are finite and positive."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

for _module in ("diffusers", "transformers", "peft", "accelerate"):
    pytest.importorskip(_module)

import torch  # noqa: E402
from step_timing import REST  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_step.py"
STEPS = 2


def load_bench():
    spec = importlib.util.spec_from_file_location("fastpref_bench_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.timeout(120)
def test_quick_run_writes_finite_positive_step_times(tmp_path, capsys):
    bench = load_bench()
    out = tmp_path / "step.json"
    threads = torch.get_num_threads()
    try:
        argv = [
            "--quick",
            "--steps",
            str(STEPS),
            "--warmup",
            "1",
            "--breakdown_rounds",
            "1",
            "--threads",
            "1",
            "--out",
            str(out),
        ]
        assert bench.main(argv) == 0
    finally:
        torch.set_num_threads(threads)  # --threads sets it process-wide
    printed = capsys.readouterr().out
    assert "| mode | label | ms | samples_per_s | vs_dpo_cached | fastpref_over_authors |" in printed

    report = json.loads(out.read_text())
    assert report["benchmark"] == "step"
    assert report["device"] and report["versions"]["torch"] == torch.__version__ and report["versions"]["diffusers"]
    config = report["config"]
    assert (
        config["model"] == "tiny"
        and config["steps"] == STEPS
        and config["samples_per_step"] == 2 * config["pairs_per_step"]
    )
    assert positive(report["wall_s"]) and len(report["load_average"]["start"]) == 3

    (mode,) = report["modes"]
    assert mode["mode"] == "lora-r8" and mode["interleaved"] is True
    rows = {row["variant"]: row for row in mode["rows"]}
    assert set(rows) == set(bench.VARIANTS)
    samples = config["samples_per_step"]
    for key, row in rows.items():
        assert len(row["timings_ms"]) == STEPS and all(positive(t) for t in row["timings_ms"]), key
        assert sorted(row["round_positions"]) == sorted(set(row["round_positions"])), key  # rotated order
        assert positive(row["ms"]) and positive(row["samples_per_s"]) and positive(row["vs_dpo_cached"]), key
        assert row["samples_per_s"] == pytest.approx(samples / (row["ms"] / 1e3)), key
        assert row["skipped_steps"] == 0, key
        assert row["steps_with_metric_on"] == (0 if row["method"] == "dpo" else STEPS), key
        assert (
            positive(row["fastpref_over_authors"])
            if row["method"] == "fastpref"
            else row["fastpref_over_authors"] is None
        ), key
    assert rows["dpo/cached"]["vs_dpo_cached"] == 1.0

    goals = mode["goals"]
    for name in ("adaptive_vs_dpo_cached", "dpo_samples_per_s_vs_diffusers_script"):
        assert positive(goals[name]["value"]) and isinstance(goals[name]["met"], bool), name
    assert positive(goals["adaptive_vs_dpo_cached"]["authors_uncached_vs_dpo_cached"])
    assert positive(goals["fastpref_speedup_over_authors"]["same_caching_uncached"])

    assert set(mode["breakdown"]) == set(bench.VARIANTS)
    for key, phases in mode["breakdown"].items():
        assert positive(phases["step"]) and positive(phases["reference fwd"]) and math.isfinite(phases[REST]), key
    assert positive(mode["breakdown"]["authors/cached"]["EMA store"])
    assert positive(mode["breakdown"]["dpo/uncached"]["encode (VAE+text)"])
    assert positive(mode["batched_probe"]["three_fwd_2B_ms"]) and positive(mode["batched_probe"]["one_fwd_6B_ms"])


@pytest.mark.parametrize(
    "arch, transformer_b, encoders_m",
    # published sizes: SD3.5 Medium 2.47B (with its 384x384 position table), FLUX.1 dev 11.90B;
    # VAE 84M, CLIP-L 123M, CLIP-G 695M, T5-XXL's encoder 4762M
    [("sd3", 2.47, [84, 124, 695, 4762]), ("flux", 11.90, [84, 123, 4762])],
)
def test_random_flow_models_have_the_published_sizes(tmp_path, arch, transformer_b, encoders_m):
    """``--model sd35m-random`` / ``flux-random``, built on the meta device (no memory): the
    configs give the published parameter counts, in bf16, recognised as their family."""
    from step_models import random_flow_encoders, random_flow_transformer

    from fastpref.train.families import FAMILIES, of_denoiser

    transformer = random_flow_transformer(arch, "meta", torch.bfloat16, 0)
    count = sum(t.numel() for t in (*transformer.parameters(), *transformer.buffers()))
    assert round(count / 1e9, 2) == transformer_b and of_denoiser(transformer) is FAMILIES[arch]
    assert {p.dtype for p in transformer.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32  # restored
    vae, tokenizers, encoders = random_flow_encoders(arch, "meta", torch.bfloat16, 0, tmp_path)
    assert [round(sum(p.numel() for p in m.parameters()) / 1e6) for m in (vae, *encoders)] == encoders_m
    assert len(tokenizers) == len(encoders)
    assert max(tokenizers[-1].get_vocab().values()) < encoders[-1].config.vocab_size  # T5's ids fit
