"""The backbone layout benchmark: its variants compute the plain backbone's features, and it reports every one."""

import io

import pytest

from uniperceiver_v2.bench import available_benchmarks, backbone_layout


def test_backbone_layout_times_the_variants_and_splits_the_profile():
    out = io.StringIO()
    parser_args = ["--batch", "2", "--size", "64", "--steps", "1", "--warmup", "0", "--variants", "plain,channels_last"]
    args = backbone_layout.argparse.Namespace(config="tiny", batch=2, size=64, steps=1, warmup=0,
                                              variants=["plain", "channels_last"], overrides=[])
    rows = backbone_layout.run(args, out=out)
    assert set(rows) == {"plain", "channels_last", "shares"}
    assert rows["plain"]["ratio"] == pytest.approx(1.0) and rows["channels_last"]["seconds"] > 0
    shares = rows["shares"]
    assert sum(shares.values()) == pytest.approx(1.0)
    assert shares["convolution forward"] > 0 and shares["convolution backward"] > 0
    text = out.getvalue()
    assert "channels_last" in text and "batch 2 x 3 x 64 x 64" in text
    assert backbone_layout.main(parser_args) == 0
    assert "backbone_layout" in available_benchmarks()


def test_backbone_layout_refuses_unknown_variants():
    with pytest.raises(SystemExit):
        backbone_layout.main(["--variants", "plain,fp16"])
