"""Ahead-of-time TPU compilation (`python -m experiments.compile`) for a v5p:2x2x2 topology.

Runs only where the `libtpu` package (the TPU compiler) is importable; no TPU is needed. Works in
the test process's JAX_PLATFORMS=cpu set-up: `get_topology_desc` builds the TPU devices anyway.
Compiled reports are shared across tests (module cache): each compile is several seconds.
"""

import dataclasses
import importlib.util
import math

import jax
import numpy as np
import pytest

from experiments import compile as aot
from experiments.compile_report import (
    INSTALL_HINT,
    CompilePlanError,
    count_collectives,
    parse_topology_name,
    require_libtpu,
)
from experiments.optimizer import build_optimizer
from experiments.presets import get_preset
from jaxmodels import training
from jaxmodels.config import ModelConfig
from sharding.rules import DEFAULT_RULES

TOPOLOGY = "v5p:2x2x2"
MESHES = ("fsdp=-1", "data=2,fsdp=2,tensor=2")
_REPORTS: dict = {}


@pytest.fixture
def tpu():
    pytest.importorskip("libtpu")


def _tiny_report(mesh: str) -> dict:
    if mesh not in _REPORTS:
        decode = mesh == MESHES[0]
        _REPORTS[mesh] = aot.plan(
            get_preset("tiny"), preset="tiny", topology=TOPOLOGY, mesh_spec=mesh, decode=decode
        )
    return _REPORTS[mesh]


@pytest.mark.parametrize("mesh", MESHES)
def test_tiny_preset_compiles_for_v5p(tpu, mesh):
    report = _tiny_report(mesh)
    train = report["steps"]["train"]
    assert train["compiled"], train["error"]
    assert report["num_devices"] == 8 and report["chip"]["name"] == "v5p"
    assert train["fits"] and train["memory"]["peak_bytes"] > 0
    assert train["memory"]["temp_bytes"] > 0
    # XLA counts at least the model's matmul FLOPs of this chip's share, and not wildly more.
    assert 1.0 <= train["flops_per_chip"] / train["model_flops_per_chip"] < 3.0
    assert 0.3 < train["mfu_bound"] <= 1.0
    expected_step = train["flops_per_chip"] / 459e12
    assert train["step_seconds_at_peak"] == pytest.approx(expected_step)
    # Parameters sharded over fsdp: the step gathers them and reduces gradients.
    collectives = train["collectives"]
    assert collectives["all-gather"] > 0
    assert collectives["all-reduce"] + collectives["reduce-scatter"] > 0


def test_scanned_stack_uses_model_flops_for_the_step_bound(tpu):
    """XLA counts a scanned stack's loop body once; the report must not claim MFU > 100 %."""
    run = get_preset("tiny")
    run = dataclasses.replace(
        run, model=dataclasses.replace(run.model, num_layers=8, scan_layers=True)
    )
    report = aot.plan(run, preset="tiny", topology=TOPOLOGY, mesh_spec=MESHES[0])
    train = report["steps"]["train"]
    assert train["compiled"], train["error"]
    assert train["flops_per_chip"] < train["model_flops_per_chip"]
    assert "mfu_bound" not in train and "loop body" in train["flops_note"]
    assert train["step_seconds_at_peak"] == pytest.approx(train["model_flops_per_chip"] / 459e12)


def test_muon_with_qk_clip_compiles(tpu):
    run = get_preset("tiny")
    run = dataclasses.replace(
        run,
        optimizer=dataclasses.replace(run.optimizer, name="muon", qk_clip_threshold=100.0),
    )
    report = aot.plan(run, preset="tiny", topology=TOPOLOGY, mesh_spec=MESHES[0])
    train = report["steps"]["train"]
    assert train["compiled"], train["error"]
    assert train["fits"]


def test_decode_steps_compile_with_sharded_caches(tpu):
    report = _tiny_report(MESHES[0])
    run = get_preset("tiny")
    for name in ("prefill", "decode"):
        step = report["steps"][name]
        assert step["compiled"], step["error"]
        assert step["fits"]
    steps = report["steps"]
    assert steps["decode"]["flops_per_chip"] < steps["prefill"]["flops_per_chip"]
    # Caches are batch-sharded 8 ways on fsdp=-1 (batch 8): one sequence's cache per chip.
    caches = jax.eval_shape(
        lambda: aot.init_caches(run.model, run.data.batch_size, run.data.seq_len + 128)
    )
    per_sequence = sum(
        math.prod(x.shape) // x.shape[0] * np.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(caches)
        if x.ndim >= 1 and x.shape[0] == run.data.batch_size
    )
    per_chip = report["steps"]["decode"]["per_chip"]["caches"]
    assert per_sequence <= per_chip < 2 * per_sequence


@pytest.mark.parametrize("mesh", MESHES)
def test_parameter_bytes_per_chip_equal_sum_of_shards(tpu, mesh):
    """Independent of `shard_bytes`: divide each dim by the mesh axes its spec names."""
    report = _tiny_report(mesh)
    run = get_preset("tiny")
    _, _, devices = aot.load_topology(TOPOLOGY)
    mesh_obj = aot.build_mesh(mesh, devices)
    tx = build_optimizer(run.optimizer, total_steps=10)
    state, _ = training.abstract_train_state(
        run.model, tx, mesh_obj, seq_len=32, rules=DEFAULT_RULES
    )
    expected = 0
    total = 0
    for leaf in jax.tree.leaves(state.params):
        shape = list(leaf.shape)
        for i, axes in enumerate(leaf.sharding.spec):
            for axis in (axes,) if isinstance(axes, str) else axes or ():
                assert shape[i] % mesh_obj.shape[axis] == 0
                shape[i] //= mesh_obj.shape[axis]
        expected += math.prod(shape) * 4  # float32 parameters
        total += math.prod(leaf.shape) * 4
    assert report["steps"]["train"]["per_chip"]["parameters"] == expected
    assert total / 8 <= expected < total  # sharded, not replicated
    # AdamW: two moments per parameter, sharded like it (+ scalar counts).
    opt = report["steps"]["train"]["per_chip"]["optimizer_state"]
    assert 2 * expected <= opt <= 2 * expected + 64


def test_oversized_config_reports_it_does_not_fit(tpu):
    """~69B parameters (a 4M-token vocabulary at width 8192): with AdamW that is ~100 GiB per
    chip on 8 chips, more than a v5p's 95 GiB."""
    base = get_preset("tiny")
    model = ModelConfig(
        vocab_size=2**22,
        hidden_size=8192,
        intermediate_size=64,
        num_layers=1,
        attention=base.model.attention,
    )
    run = dataclasses.replace(base, model=model)
    report = aot.plan(run, preset="huge", topology=TOPOLOGY, mesh_spec="fsdp=-1", seq=32, batch=8)
    train = report["steps"]["train"]
    per_chip = train["per_chip"]
    assert per_chip["parameters"] + per_chip["optimizer_state"] > report["hbm_bytes_per_device"]
    assert train["fits"] is False
    text = aot.format_report(report)
    print(text)
    assert "fits in HBM: NO" in text
    if not train["compiled"]:  # libtpu refuses the program: its error says why
        assert "memory" in train["error"].lower() or "RESOURCE_EXHAUSTED" in train["error"]


def test_unknown_topology_is_a_clear_error():
    with pytest.raises(CompilePlanError, match="unknown TPU topology 'v9x:2x2'.*v5p"):
        parse_topology_name("v9x:2x2")
    with pytest.raises(CompilePlanError, match="must be integers"):
        parse_topology_name("v5p:2xtwo")
    chip, shape = parse_topology_name("v5litepod:16x16")
    assert (chip.name, shape, chip.peak_bf16_flops) == ("v5e", (16, 16), 197e12)


def test_missing_libtpu_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a)
    )
    with pytest.raises(CompilePlanError, match="needs the `libtpu` package") as info:
        require_libtpu()
    assert INSTALL_HINT in str(info.value) and '".[tpu]"' in str(info.value)


def test_mesh_that_does_not_divide_the_devices(tpu, capsys):
    _, _, devices = aot.load_topology(TOPOLOGY)
    with pytest.raises(CompilePlanError, match="does not fit the topology's 8 devices"):
        aot.build_mesh("fsdp=3", devices)
    rc = aot.main(["--topology", TOPOLOGY, "--preset", "tiny", "--mesh", "fsdp=-1,tensor=3"])
    assert rc == 2 and "8 devices" in capsys.readouterr().err
    rc = aot.main(["--topology", "v7q:2x2", "--preset", "tiny"])
    assert rc == 2 and "unknown TPU topology" in capsys.readouterr().err
    rc = aot.main(["--topology", TOPOLOGY, "--preset", "tiny", "--model.no_such_field=1"])
    assert rc == 2 and "no_such_field" in capsys.readouterr().err


def test_count_collectives_parses_sync_and_async_ops():
    hlo = "\n".join(
        [
            "  %ag = f32[8,4]{1,0} all-gather-start(f32[1,4]{1,0} %p), dimensions={0}",
            "  %agd = f32[8,4]{1,0} all-gather-done(%ag)",
            "  %ar = f32[4]{0} all-reduce(f32[4]{0} %x), to_apply=%add",
            "  %rs = f32[1]{0} reduce-scatter(f32[8]{0} %y), dimensions={0}",
            "  %cp = (f32[2], f32[2]) collective-permute-start(f32[2] %z)",
            "  %a2a = f32[8]{0} all-to-all(f32[8]{0} %w), dimensions={0}",
            "  %add = f32[] add(f32[] %a, f32[] %b)  // all-reduce mentioned in a comment",
        ]
    )
    assert count_collectives(hlo) == {
        "all-reduce": 1,
        "all-gather": 1,
        "reduce-scatter": 1,
        "all-to-all": 1,
        "collective-permute": 1,
    }
