"""bench/bench_corpora.py runs end to end on a few tiny videos and prints its table."""

from bench import bench_corpora


def test_conversion_rates_beside_the_decoding_limit(capsys):
    assert bench_corpora.main(["--n_videos", "3", "--width", "64", "--height", "48", "--seconds", "1",
                               "--fps", "10"]) == 0
    out = capsys.readouterr().out
    for row in ("convert from files (OpenCV", "convert from webdataset shards (PyAV", "decoding alone: PyAV",
                "decoding alone: ffmpeg"):
        line = next(line for line in out.splitlines() if line.startswith(row))
        rate = float(line[58:68])
        assert rate > 0
    assert "same labels from both paths: True" in out
