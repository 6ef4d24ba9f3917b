"""bench/plot.py: which columns of a benchmark table name rows and which are drawn, and the
PNG written beside the table and linked from its Markdown (issue 14: results as plots)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import plot  # noqa: E402


@pytest.mark.parametrize("headers, rows, labels, panels", [
    (["VMs", "raw", "pcocc", "ratio"], [[1, "4.52", "4.64", "1.03"], [2, "4.13", "4.31", "1.05"]], [0], [1, 2, 3]),
    (["mem", "filled", "ckpt", "size"], [[256, 96, "0.99", "127.5"], [512, 192, "1.19", "223.8"]], [0, 1], [2, 3]),
    (["size", "n", "pcocc", "speed-up"], [["1 GiB", 64, "0.014", "50x"]], [0, 1], [2, 3]),
    (["command", "median", "goal", "note"], [["a", "0.01", "", "text"], ["b", "0.06", "0.15", "more"]], [0], [1, 2]),
])
def test_label_and_panel_columns(headers, rows, labels, panels):
    assert plot.split_columns(headers, rows) == (labels, panels)


def test_a_table_gets_its_png_and_one_link(tmp_path):
    table = {"benchmark": "demo", "date": "now", "headers": ["VMs", "first line (s)"], "rows": [[1, "0.26"], [4, "0.9"]]}
    (tmp_path / "demo.json").write_text(json.dumps(table))
    (tmp_path / "demo.md").write_text("# Demo\n\n| VMs | first line (s) |\n")
    png = plot.plot(str(tmp_path / "demo.json"))
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for _ in range(2):
        plot.link(str(tmp_path / "demo.md"), png)
    assert (tmp_path / "demo.md").read_text() == "# Demo\n\n![demo.png](demo.png)\n\n| VMs | first line (s) |\n"
    (tmp_path / "text.json").write_text(json.dumps({**table, "rows": [[1, "n/a"]]}))
    assert plot.plot(str(tmp_path / "text.json")) is None  # nothing to draw: no figure
