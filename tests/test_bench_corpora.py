"""bench/bench_corpora.py runs end to end on tiny sources and prints, per kind of source, each path's cost beside
the decoding limit, and that the default path wrote the sequential path's bytes."""

import pytest

from bench import bench_corpora

CONVERSIONS = ("sequential", "default", "swscale")


@pytest.mark.integration  # starts fresh interpreters to time the converter's start-up
def test_costs_per_kind_beside_the_decoding_limit(capsys):
    assert bench_corpora.main(["--n_short", "2", "--n_long", "1", "--long_seconds", "20", "--rounds", "1",
                               "--short_size", "64x48", "--long_size", "96x64"]) == 0
    out = capsys.readouterr().out
    lines = {line.split(" | ")[0]: line.split(" | ") for line in out.splitlines() if " | " in line}
    header = lines["kind"]
    for kind, clips in (("short clips", 2), ("long videos, whole", 1), ("long sources, 10 windows", 10)):
        row = dict(zip(header, lines[kind]))
        assert int(row["clips"]) == clips
        costs = {key: float(row[key]) for key in ("sequential", "default", "swscale", "limit", "colour", "resize",
                                                  "jpeg", "necessary")}
        # printed to 0.1 ms: a tiny frame's colour conversion may print as 0.0, a whole conversion never does
        assert all(value >= 0 for value in costs.values()) and min(costs[p] for p in CONVERSIONS) > 0, costs
        parts = costs["limit"] + costs["colour"] + costs["resize"] + costs["jpeg"]
        assert abs(costs["necessary"] - parts) <= 0.3  # the sum of its parts, each rounded
        decoded, of = (int(n) for n in row["frames decoded"].split(" of "))
        if kind == "short clips":  # one keyframe: all its reference frames, less the skipped B-frames
            assert 0 < decoded <= of + 3  # + the B-frame reorder depth past the last sampled frame
        else:  # a keyframe every 5 s, non-reference frames skipped: fewer than decoding from the first frame
            assert 0 < decoded < of
        assert row["same bytes"] == "True"
    assert "start-up of a conversion worker (its imports):" in out
