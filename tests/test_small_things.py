"""Small things a user hits (issue 10, part 6): notices, progress output, bench options."""

from __future__ import annotations

from types import SimpleNamespace

from camel import flash


def _qkv(t, d, device="mps"):
    shape = (1, 2, t, d)
    x = SimpleNamespace(shape=shape, ndim=4, device=device)
    return x, x, x


def test_naive_attention_notice_is_printed_once_per_process(monkeypatch, capsys):
    monkeypatch.setattr(flash, "_noticed", set())
    for t in (5, 6, 7):  # a growing T, as in generation; then another unsupported head dim
        assert flash.select("sdpa", "", *_qkv(t, 16)) is None
    assert flash.select("sdpa", "flash", *_qkv(3, 24)) is None
    err = capsys.readouterr().err
    assert err.count("using the naive path") == 1, err
    assert "head dim D = 16 has no flash kernel" in err


def test_bench_matmul_plot_without_matplotlib_fails_before_the_run(monkeypatch, capsys):
    import sys

    from camel.bench import matmul

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises
    ran = []
    monkeypatch.setattr(matmul, "validate", lambda versions: ran.append(versions) or versions)
    monkeypatch.setattr(matmul, "run", lambda *a: ran.append(a) or ([], False))
    assert matmul.main(["--plot", "ladder.png", "--sizes", "8", "--versions", "1"]) == 2
    captured = capsys.readouterr()
    assert "--plot needs matplotlib" in captured.err
    assert ran == [] and "validating" not in captured.out


def test_bench_sim_marks_each_target_ok_or_missed(capsys):
    from camel import metal
    from camel.bench import sim

    assert (sim.verdict(4.9, 5), sim.verdict(5.1, 5), sim.verdict(1.0, None)) == (
        "ok",
        "MISSED",
        "",
    )
    if not metal.is_simulator():
        return  # the run measures the simulator only
    assert sim.main(["--repeat", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "| <=" in line]
    assert len(rows) == 4, rows
    for line in rows:
        assert line.endswith((" ok", " MISSED")), line


def test_bench_cpu_claims_a_pytorch_check_only_when_it_ran_one(monkeypatch, capsys):
    from camel.bench import cpu

    monkeypatch.setattr(cpu, "torch", None)
    monkeypatch.setattr(cpu, "mps_available", lambda: False)
    assert cpu.main(["--iters", "2", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "checked equal to PyTorch" not in out
    assert "PyTorch is not installed: nothing was checked against it" in out


def test_bandwidth_benches_time_on_the_simulator_like_the_ladders(capsys):
    # matmul and attention time on the simulator (labelled); the memory-bound benches do too.
    from argparse import Namespace

    from camel import metal
    from camel.bench import bandwidth

    if not metal.is_simulator():
        return
    code, unit = bandwidth.start(Namespace(time=False), validate=lambda: True)
    assert (code, unit) == (None, "sim GB/s")
    assert "NOT GPU timings" in capsys.readouterr().out
