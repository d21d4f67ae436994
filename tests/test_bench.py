"""The benchmark machinery (bench/common.py, run.py, report.py and the family scripts) on tiny
configurations: the JSON schema, the tables, the plots and the README section. No speed
assertions: these check that the suite runs and reports, not how fast anything is."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import cpu_attention  # noqa: E402
import paper_table2  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402
import xl_attention  # noqa: E402

import effattn  # noqa: E402

pytestmark = pytest.mark.skipif("cpu" not in effattn.backends(), reason="C++ CPU backend")

TIMED = {"times_s", "median_s", "min_s", "max_s", "q1_s", "q3_s", "iqr_s", "repeats"}


ORIG_TABLE2 = paper_table2.run


def tiny_table2(device, quick, context=None, progress=None):
    """paper_table2.run at a context of 256 with a one-layer, 64-wide model, one iteration."""
    return ORIG_TABLE2(device, quick, 256, progress, iters=1, layers=1, d_model=64)


@pytest.fixture(scope="module")
def docs():
    """One tiny result document per CPU family."""
    return [
        cpu_attention.run(sizes=[256], repeats=1, flex=False),
        xl_attention.run("cpu", True, sizes=[128], eval_lengths=[800], repeats=1, eval_batch=1),
        tiny_table2("cpu", True),
    ]


def check_header(doc, family):
    assert common.is_result(doc)
    assert doc["family"] == family and doc["device"] == "cpu"
    assert {"name", "cpu", "torch_threads", "load_average", "load_average_end"} <= doc[
        "machine"
    ].keys()
    assert {"torch", "triton", "python", "effattn", "git_commit"} <= doc["versions"].keys()
    assert doc["versions"]["effattn_path"] == str(Path(effattn.__file__).parent)
    assert doc["versions"]["effattn_extension"] == "loaded"
    assert all("backend" in r for r in doc["rows"])  # what served every row
    json.dumps(doc)  # every figure serializable


def test_summarize_quartiles():
    s = common.summarize([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (s["median_s"], s["min_s"], s["max_s"]) == (3.0, 1.0, 5.0)
    assert (s["q1_s"], s["q3_s"], s["iqr_s"]) == (2.0, 4.0, 2.0)
    assert common.summarize([7.0])["iqr_s"] == 0.0


def test_measure_cpu():
    m = common.measure(lambda: sum(range(1000)), "cpu", repeats=3)
    assert TIMED <= m.keys() and m["repeats"] == 3 and len(m["cpu_times_s"]) == 3
    assert m["min_s"] <= m["median_s"] <= m["max_s"]


def test_cpu_attention_schema(docs):
    doc = docs[0]
    check_header(doc, "cpu_attention")
    methods = {(r["method"], r["pattern"], r["pass"]) for r in doc["rows"]}
    assert ("sdpa_causal", "causal()", "fwd+bwd") in methods
    assert ("effattn", "strided(128)", "fwd") in methods
    for r in doc["rows"]:
        assert TIMED <= r.keys() and r["ratio_to_sdpa_causal"] > 0
        assert r["backend"] == {"effattn": "cpu"}.get(r["method"], "sdpa")
    assert "| 256 | `fixed(128, 16)` |" in cpu_attention.table(doc)


def test_xl_attention_schema(docs):
    doc = docs[1]
    check_header(doc, "xl_attention")
    kernel = [r for r in doc["rows"] if r["table"] == "kernel"]
    assert {(r["impl"], r["mode"]) for r in kernel} == {
        (i, m) for i in ("original", "effattn") for m in ("fwd", "fwd+bwd")
    }
    assert {r["backend"] for r in kernel if r["impl"] == "effattn"} == {"cpu"}
    assert {r["backend"] for r in kernel if r["impl"] == "original"} == {"pytorch"}
    (ev,) = [r for r in doc["rows"] if r["table"] == "eval"]
    assert ev["attn_len"] == 800 and ev["paper_speedup"] == 363
    assert ev["first_step_logits_agree"] and ev["first_segment_logits_agree"]
    assert ev["segment_speedup"] > 0 and ev["speedup"] > 0
    assert "363x" in xl_attention.table(doc)


def test_paper_table2_schema(docs):
    doc = docs[2]
    check_header(doc, "paper_table2")
    assert [r["variant"] for r in doc["rows"]] == ["dense", "fixed", "strided"]
    assert [r["backend"] for r in doc["rows"]] == ["sdpa", "cpu", "cpu"]
    assert doc["rows"][0]["ratio_to_dense"] == 1.0
    assert "0.27 (0.35)" in paper_table2.table(doc)


def fake_sparse_doc():
    """A document in the shape run.py gives bench/sparse_attention.py's rows (GPU only)."""
    rows = []
    for n in (2048, 4096):
        for ps in ("fwd", "fwd+bwd"):
            base = dict(method="sdpa_causal", pattern="causal()", d=64, n=n, ms=1.0, tflops=100.0,
                        peak_mib=10.0, **{"pass": ps})  # fmt: skip
            rows.append(base)
            for method, ms in (("effattn", 0.3), ("effattn_cuda", 0.35), ("flex", 0.5),
                               ("reference", 4.0)):  # fmt: skip
                rows.append(dict(base, method=method, pattern="strided(128)", ms=ms,
                                 density_vs_causal=0.07))  # fmt: skip
    info = {"name": "Fake GPU", "load_average": None}
    return common.payload("sparse_attention", "cuda", info, {"quick": True}, rows, quick=True)


def test_report_renders_section(docs, tmp_path):
    for doc in docs:
        common.write_json(doc, tmp_path / f"{doc['family']}_cpu.json")
    (tmp_path / "old_format.json").write_text(json.dumps({"results": []}))  # ignored
    section = report.render(tmp_path, tmp_path)
    assert report.NO_GPU in section
    for family in ("cpu_attention", "xl_attention", "paper_table2"):
        assert report.TITLES[family][0] in section
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert "cpu_attention_cpu_speedup.png" in pngs and "xl_attention_cpu_eval.png" in pngs
    assert "![cpu_attention_cpu_time](cpu_attention_cpu_time.png)" in section

    common.write_json(fake_sparse_doc(), tmp_path / "sparse_attention_fake_gpu_quick.json")
    section = report.render(tmp_path, tmp_path)
    assert "GPU figures: Fake GPU." in section and report.NO_GPU not in section
    assert "| 64 | 4096 | `strided(128)` | 0.070 | fwd+bwd | 1.000 | 0.300 |" in section

    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Benchmarks\n\n{report.START}\nold\n{report.END}\n\n## After\n")
    report.update_readme(section, readme)
    text = readme.read_text()
    assert "old" not in text and "GPU figures" in text and text.endswith("## After\n")


def test_select_latest_prefers_full_runs():
    def doc(date, quick):
        return {"family": "paper_table2", "device": "cpu", "date": date, "quick": quick,
                "args": {}, "rows": [{}]}  # fmt: skip

    full, newer_quick = doc("2026-01-01", False), doc("2026-02-01", True)
    assert report.select_latest([full, newer_quick]) == [full]
    assert report.select_latest([newer_quick]) == [newer_quick]


def test_run_main_tiny(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(run.paper_table2, "run", tiny_table2)
    assert run.main(["--device", "cpu", "--families", "table2,sparse", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "skip sparse on cpu" in out and "Table 2" in out and "paper's ratio" in out
    doc = json.loads((tmp_path / "paper_table2_cpu_quick.json").read_text())
    check_header(doc, "paper_table2")
    assert (tmp_path / "paper_table2_cpu_quick_table2.png").exists()
    with pytest.raises(SystemExit):
        run.main(["--families", "nope"])


# --------------------------------------------------------------------------- what ran
def test_bench_imports_the_installed_effattn():
    """common.py puts the checkout on sys.path only where no effattn is installed, and last:
    first, it would shadow an installed package (and its built extension)."""
    code = (
        f"import sys; sys.path.insert(0, {str(BENCH)!r}); import common, effattn; "
        f"print(effattn.__file__); print({str(common.ROOT)!r} in sys.path)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert res.returncode == 0, res.stderr
    path, on_path = res.stdout.split()
    assert Path(path).resolve() == Path(effattn.__file__).resolve() and on_path == "False"


@pytest.fixture
def no_cpu_kernels(monkeypatch):
    """effattn as a checkout without the built extension shows itself."""
    from effattn.ops import dispatch

    why = "No module named 'effattn._C' (test)"
    monkeypatch.setattr(dispatch.CpuBackend, "unavailable", lambda self: why)


def test_families_refuse_to_run_without_their_backend(no_cpu_kernels):
    for family, call in (
        ("cpu_attention", lambda: cpu_attention.run(sizes=[256], repeats=1, flex=False)),
        ("xl_attention", lambda: xl_attention.run("cpu", True, sizes=[128], eval_lengths=[800])),
        ("paper_table2", lambda: tiny_table2("cpu", True)),
    ):
        with pytest.raises(common.BackendMissing) as info:
            call()
        msg = str(info.value)
        assert family in msg and "'cpu'" in msg and "No module named 'effattn._C' (test)" in msg
    # asked for by name, the blockwise path runs and says so
    doc = xl_attention.run(
        "cpu", True, "kernel", sizes=[64], repeats=1, backend="torch", eval_batch=1
    )
    assert {r["backend"] for r in doc["rows"] if r["impl"] == "effattn"} == {"torch"}


def test_run_refuses_a_family_and_runs_the_others(no_cpu_kernels, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    assert run.main(["--device", "cpu", "--families", "cpu", "--quick", "--no-plots"]) == 1
    out = capsys.readouterr().out
    assert "refused cpu_attention on cpu" in out and "cannot run here" in out
    assert not list(tmp_path.glob("*.json"))


def test_report_writes_the_readme_only_when_asked(docs, tmp_path, capsys):
    for doc in docs:
        common.write_json(doc, tmp_path / f"{doc['family']}_cpu.json")
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{report.START}\nold\n{report.END}\n")
    args = ["--results", str(tmp_path), "--readme", str(readme)]
    assert report.main(args) == 0
    assert (
        "old" in readme.read_text() and report.TITLES["xl_attention"][0] in capsys.readouterr().out
    )
    assert not list(tmp_path.glob("*.png"))  # printing draws nothing either
    assert report.main([*args, "--write-readme"]) == 0
    assert "old" not in readme.read_text() and list(tmp_path.glob("*.png"))
