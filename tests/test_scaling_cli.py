"""`pagedlm scaling` CLI, run through main() and through add_parser() on a fresh top-level parser."""
import argparse
import json

import numpy as np
import pytest

from pagedlm.scaling import CHINCHILLA
from pagedlm.scaling.cli import add_parser, main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_optimal_prints_closed_form_and_numeric(capsys):
    code, out, _ = run(capsys, "optimal", "--flops", "1.23e22")
    n_opt = CHINCHILLA.optimal(1.23e22)[0]
    assert code == 0
    assert out.count(f"{n_opt:.4g}") == 2  # closed form and numeric minimiser agree to 4 digits
    code, out, _ = run(capsys, "optimal", "--flops", "1.23e22", "--law", "epoch2024")
    assert "482.01" in out and "20.3" in out  # Besiroglu et al.'s law: ~20 tokens per parameter


def test_params_from_preset_and_hf_file(capsys, tmp_path):
    code, out, _ = run(capsys, "params", "--preset", "llama-13b")
    assert code == 0 and "13,015,864,320" in out and "819,200 bytes" in out
    hf = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257, "n_positions": 1024}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    code, out, _ = run(capsys, "params", "--hf", str(tmp_path / "config.json"))
    assert code == 0 and "124,439,808" in out


def test_memory_table(capsys):
    code, out, _ = run(capsys, "memory", "--preset", "llama-7b", "--batch", "2", "--seq-len", "4096", "--zero-stage",
                       "3", "--dp", "8", "--recompute", "full", "--flash-attention", "--kv-dtype", "fp8")
    assert code == 0
    assert "optimizer states" in out and "kv cache" in out
    assert f"{12 * 6_738_415_616 / 8 / 2**30:,.2f} GiB" in out  # Adam states split 8 ways
    assert f"{2 * 4096 * 262_144 / 2**30:,.2f} GiB" in out  # fp8 KV: 2 x 32 layers x 4096 bytes per token


def test_design_from_dollars(capsys):
    code, out, _ = run(capsys, "design", "--budget-dollars", "5e6", "--gpu", "H100")
    assert code == 0
    assert "2.85e+24 FLOPs" in out  # 5e6 / 2.50 * 3600 * 989e12 * 0.4
    assert "Why:" in out and "n_layers" in out


def test_presets_lists_sources(capsys):
    code, out, _ = run(capsys, "presets")
    assert code == 0 and "Touvron et al. 2023" in out and "mistral-7b" in out


@pytest.mark.parametrize("argv, field", [
    (["params", "--preset", "gpt-5"], "preset"),
    (["design", "--flops", "1e22", "--gpu", "TPU"], "gpu"),
    (["optimal", "--flops", "-5"], "C"),
    (["memory", "--preset", "llama-7b", "--tp", "3"], "tp"),
])
def test_bad_input_exits_2_and_names_the_field(capsys, argv, field):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert "error" in err and field in err


def test_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "isoflop.png"
    code, out, _ = run(capsys, "plot", "--out", str(path))
    assert code == 0 and "wrote" in out
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_with_measured_runs_fits_them(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(0)
    rows = []
    for C in (1e18, 1e19, 1e20):
        for N in np.logspace(np.log10(CHINCHILLA.optimal(C)[0]) - 0.6, np.log10(CHINCHILLA.optimal(C)[0]) + 0.6, 5):
            D = C / (6 * N)
            rows.append(f"{N:.6g},{D:.6g},{C:.6g},{CHINCHILLA.loss(N, D) * np.exp(rng.normal(0, 0.002)):.6f}")
    runs = tmp_path / "runs.csv"
    runs.write_text("N,D,flops,loss\n" + "\n".join(rows) + "\n")
    code, out, _ = run(capsys, "plot", "--out", str(tmp_path / "fit.png"), "--runs", str(runs))
    assert code == 0 and "fit" in out
    assert (tmp_path / "fit.png").read_bytes()[:4] == b"\x89PNG"
    runs.write_text("N,D,loss\n1,2,3\n")
    code, _, err = run(capsys, "plot", "--out", str(tmp_path / "bad.png"), "--runs", str(runs))
    assert code == 2 and "flops" in err


def test_add_parser_hangs_scaling_under_a_top_level_cli(capsys):
    top = argparse.ArgumentParser(prog="pagedlm")
    commands = top.add_subparsers(dest="command")
    add_parser(commands)
    args = top.parse_args(["scaling", "optimal", "--flops", "1e21"])
    assert args.func(args) == 0
    assert "N_opt" in capsys.readouterr().out
    args = top.parse_args(["scaling"])
    assert args.func(args) == 0
    assert "optimal" in capsys.readouterr().out  # bare `pagedlm scaling` prints its help
