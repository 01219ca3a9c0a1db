"""precision="auto": the fastest measured path within the error budget, per graph and batch
size; decisions cached on disk per machine and bundle; the budget enforced; errors typed."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import vaeinfer
from vaeinfer import auto_precision as auto


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VAEINFER_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "auto"


def _every_choice(info):
    return [(role, batch, path) for role, d in info.auto.items() for batch, path in d["choice"].items()]


@pytest.mark.parametrize("name", vaeinfer.available_models())
def test_chosen_paths_are_within_the_budget_and_cached(name, cache, monkeypatch):
    model = vaeinfer.load(name, device="cpu", threads=2, precision="auto", max_error=0.01)
    info = model.info
    assert info.precision == "auto" and info.auto
    for role, batch, path in _every_choice(info):
        d = info.auto[role]
        assert d["errors"][path] <= d["max_error"] == 0.01, (role, batch, path)
        assert d["peaks"][path] <= auto.PEAK_FACTOR * 0.01, (role, batch, path)
        assert f"batch {batch}+: {path}" in d["why"] and not d["cached"]
    assert len(list(cache.glob("*.json"))) == len(info.auto)
    images = model.sample(8, seed=5)

    def no_measuring(*args, **kwargs):
        raise AssertionError("a cached decision was measured again")

    monkeypatch.setattr(auto, "measure", no_measuring)
    again = vaeinfer.load(name, device="cpu", threads=2, precision="auto", max_error=0.01)
    assert all(d["cached"] for d in again.info.auto.values())
    assert _every_choice(again.info) == _every_choice(info)
    np.testing.assert_array_equal(again.sample(8, seed=5), images)  # same machine, paths, threads: bit-identical


def test_a_zero_budget_keeps_the_exact_reference():
    info = vaeinfer.load("mnist-vae", device="cpu", precision="auto", max_error=0).info
    assert {path for _, _, path in _every_choice(info)} == {"cpu/fp32"}
    assert info.backend == "cpu"


def test_a_named_backend_limits_the_candidates():
    info = vaeinfer.load("mnist-vae", device="cpu", backend="cpu", precision="auto").info
    for d in info.auto.values():
        assert all(path.startswith("cpu/") for path in d["errors"])


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "x", None.__class__])
def test_bad_budgets_are_value_errors(bad):
    with pytest.raises(ValueError, match=r"max_error must be a number in \[0, 1\]"):
        vaeinfer.load("mnist-vae", device="cpu", precision="auto", max_error=bad)


def test_a_budget_without_auto_is_refused():
    with pytest.raises(ValueError, match="max_error is the error budget of precision='auto'"):
        vaeinfer.load("mnist-vae", device="cpu", precision="fp32", max_error=0.01)


def test_an_unreadable_cache_is_measured_again(cache):
    vaeinfer.load("mnist-vae-2d", device="cpu", threads=1, precision="auto")
    for file in cache.glob("*.json"):
        file.write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable decision cache"):
        model = vaeinfer.load("mnist-vae-2d", device="cpu", threads=1, precision="auto")
    assert not any(d["cached"] for d in model.info.auto.values())
    assert all(json.loads(f.read_text())["role"] for f in cache.glob("*.json"))  # rewritten whole


def test_a_decision_dispatches_by_batch_size():
    d = auto.Decision(role="decoder", reference="cpu/fp32", choice={1: "cpu/fp32", 64: "openvino/bf16"}, errors={}, peaks={}, seconds={},
                      max_error=0.01)
    assert [d.path_for(n) for n in (0, 1, 63, 64, 1000)] == ["cpu/fp32"] * 3 + ["openvino/bf16"] * 2
    assert auto.Decision.from_json(json.loads(json.dumps(d.to_json()))).choice == d.choice


def test_output_error_is_a_fraction_of_the_range():
    ref = [np.array([[0.0, 2.0], [1.0, 1.0]], np.float32), np.array([1, 2, 3, 4])]
    got = [ref[0] + 0.02, np.array([1, 2, 3, 5])]
    assert auto.output_error(ref, got) == pytest.approx((0.25, 0.25))  # codes: 1 of 4 differ, above the floats'
    assert auto.output_error(ref[:1], got[:1]) == pytest.approx((0.01, 0.01))
    spike = [ref[0].copy()]
    spike[0][0, 0] += 0.4  # one value off by 20% of the range: the mean is 5%, the peak 20%
    assert auto.output_error(ref[:1], spike) == pytest.approx((0.05, 0.2))
    assert auto.within_budget(0.005, 0.09, 0.01) and not auto.within_budget(0.005, 0.11, 0.01)


def test_cli_and_server_take_auto(tmp_path):
    from vaeinfer.cli import main

    r = CliRunner().invoke(main, ["sample", "--device", "cpu", "--precision", "auto", "--max-error", "0.005",
                                  "-n", "4", "-o", str(tmp_path / "s.png")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["info", "-m", "mnist-vae", "--device", "cpu", "--precision", "auto",
                                  "--max-error", "0.005"])
    assert r.exit_code == 0, r.output
    shown = json.loads(r.output)["auto"]
    assert set(shown) == {"encoder", "decoder"} and all(d["max_error"] == 0.005 for d in shown.values())
    r = CliRunner().invoke(main, ["sample", "--precision", "auto", "--max-error", "2", "-o", str(tmp_path / "x.png")])
    assert r.exit_code != 0 and "--max-error" in r.output
    pytest.importorskip("fastapi")
    from vaeinfer.serve import ServeConfig, create_app

    app = create_app(ServeConfig(models=("mnist-vae",), device="cpu", precision="auto", max_error=0.005))
    assert app.state.served["mnist-vae"].model.info.precision == "auto"
