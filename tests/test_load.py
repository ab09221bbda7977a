"""The load benchmark (benchmarks/load_embed.py) at 20,000 rows: embed streams, keeps every row in order.

64 px images make the contrast: the rows' images fill 312 MB of stacks, so an ``embed`` that held them, or
that kept every page of the stacks it read resident (as reading through memory maps does), grows by at least
that much; streaming grows by the STAR table, a batch or two and fixed costs (about 80-130 MB here, a third
of it escnn building the model). The model has one rotation and a 61 px kernel: its 4 x 4 translation grid
makes encoding cheap.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import load_embed  # noqa: E402

ROWS, BOX = 20_000, 64


@pytest.mark.slow
def test_embed_of_20000_rows_streams_and_keeps_every_row_in_order(tmp_path):
    result = load_embed.run_benchmark(tmp_path, n_rows=ROWS, n_stacks=2, box=BOX, batch_size=1024,
                                      model_overrides=dict(rotations=1, encoder_kernel=BOX - 3))
    assert result["output_rows"] == ROWS and result["order_kept"] and result["z_finite"]
    assert not result["peak_since_start"]  # the peak is that of embed alone
    assert result["all_images_mb"] == ROWS * BOX * BOX * 4 / 2 ** 20
    assert result["growth_mb"] < 0.6 * result["all_images_mb"], load_embed.markdown_table(result)
