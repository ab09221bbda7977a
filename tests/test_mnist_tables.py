"""Smoke test of the Table 1/2 benchmark at the tiny budget: one TARGET-VAE cell and one baseline."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "mnist_tables.py"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("mnist_tables", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(markdown: str, prefix: str) -> list[str]:
    line = next(line for line in markdown.splitlines() if line.startswith(prefix))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_tiny_cell_and_baseline_write_both_tables(tmp_path, capsys, mnist_dir):
    bench = _load_benchmark()
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\n## Other section\n\nkeep me\n")
    args = ["--data", str(mnist_dir), "--budget", "tiny", "--groups", "4", "--z-dims", "2", "--variants", "U",
            "--baselines", "vae", "--workdir", str(tmp_path / "work"), "--results", str(results), "--quiet"]
    text = bench.main(args)
    assert text in capsys.readouterr().out
    written = results.read_text()
    assert "## Other section\n\nkeep me" in written and written.count(bench.SECTION) == 1
    target = _row(written, "| TARGET-VAE P4 | 2 | MNIST(U) |")
    vae = _row(written, "| VAE | 4 | MNIST(U) |")
    for row in (target, vae):  # params, paper, ours Ward, k-means: all numbers
        assert all(float(value) >= 0 for value in row[3:7]), row
    rotation_row = _row(written, "| TARGET-VAE P4 | MNIST(U) |")
    assert -1 <= float(rotation_row[6]) <= 1
    assert _row(written, "| TARGET-VAE P8 | 2 | MNIST(U) |")[5] == "—"  # not run
    assert (tmp_path / "work" / "tiny" / "target_P4_z2_U" / "scores.json").exists()
    assert (tmp_path / "work" / "tiny" / "vae_U" / "scores.json").exists()
    # a second invocation reuses the scored cells instead of retraining and rewrites the section in place
    bench.main(args)
    rewritten = results.read_text()
    assert rewritten.count(bench.SECTION) == 1 and "this invocation" in rewritten
    # --report-only trains nothing, so it states no wall time of its own
    bench.main([*args, "--report-only"])
    tabulated = results.read_text()
    assert tabulated.count(bench.SECTION) == 1 and "this invocation" not in tabulated
