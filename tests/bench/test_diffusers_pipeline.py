"""bench/diffusers_pipeline.py at toy size: diffusers' PixArtSigmaPipeline with our transformer and with diffusers',
the same latents (fp32), the JSON's figures."""

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_the_arms_agree_and_the_json_has_the_figures(tmp_path):
    sys.path.insert(0, str(BENCH))
    import diffusers_pipeline

    out = tmp_path / "dp.json"
    argv = ["--size", "64", "--steps", "2", "--runs", "1", "--layers", "1", "--no-flex", "--out", str(out)]
    payload = diffusers_pipeline.main(argv)
    assert set(payload["median_s"]) == {"diffusers", "ours", "ours_untrimmed"} and out.is_file()
    assert max(payload["max_relative_diff_vs_diffusers"].values()) < 1e-5
    assert payload["speedup_vs_diffusers"]["diffusers"] == 1.0
    assert payload["config"]["text_tokens"] == 300 and payload["machine"]["torch"]
