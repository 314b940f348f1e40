"""The main job's command line and run config: dotted overrides parsed by type, errors that
name the flag, the value and the rule (raised before anything compiles), --help, presets."""

import dataclasses
import json
import sys
import textwrap

import pytest

from experiments import cli, presets
from experiments import train as train_job
from experiments.config import OptimizerConfig, RunConfig, TrainConfig, run_from_dict, run_to_dict
from experiments.data import DataConfig
from jaxmodels.attention.gqa import GQAConfig
from jaxmodels.config import ConfigError, ModelConfig, RopeConfig


def parse(*argv):
    return cli.parse_args(["--preset", "tiny", *argv]).config


def test_overrides_are_parsed_by_field_type():
    config = parse(
        "--model.num_layers=3",
        "--optimizer.learning_rate=1e-3",
        "--model.tie_word_embeddings=yes",
        "--model.dtype",
        "bfloat16",  # the `--flag value` form
        "--data.path=none",
        "--model.layer_pattern=gqa,gqa",
        "--data.mqar_key_range=(1, 64)",
        "--train.sample_top_k=5",
        "--train.sample_top_p=none",
        "--train.progress",  # a bare boolean flag
        "--train.steps=1e3",  # an integral float is accepted for an int
    )
    assert config.model.num_layers == 3
    assert config.optimizer.learning_rate == 1e-3
    assert config.model.tie_word_embeddings is True
    assert config.model.dtype == "bfloat16"
    assert config.data.path is None
    assert config.model.layer_pattern == ("gqa", "gqa")
    assert config.data.mqar_key_range == (1, 64)
    assert config.train.sample_top_k == 5 and config.train.sample_top_p is None
    assert config.train.progress is True and config.train.steps == 1000
    untouched = presets.get_preset("tiny")
    assert config.model.hidden_size == untouched.model.hidden_size
    assert config.data == dataclasses.replace(untouched.data, mqar_key_range=(1, 64))


def test_nested_attention_fields_and_new_entries():
    config = parse(
        "--model.attention.gqa.num_heads=8",
        "--model.attention.gqa.rope.theta=5e5",
        "--model.num_layers=4",
        "--model.layer_pattern=gqa,local",
        "--model.attention.local.sliding_window=16",  # given before its kind: order is free
        "--model.attention.local.kind=gqa",
    )
    gqa, local = config.model.attention["gqa"], config.model.attention["local"]
    assert gqa.num_heads == 8 and gqa.num_kv_heads == 2 and gqa.rope.theta == 5e5
    assert isinstance(local, GQAConfig) and local.sliding_window == 16
    assert local.num_heads == GQAConfig().num_heads  # the kind's defaults
    assert [a.sliding_window for a in config.model.layer_attention] == [None, 16, None, 16]
    # Naming an entry's own kind keeps its settings; another kind would start from defaults.
    same = parse("--model.attention.gqa.kind=gqa", "--model.residual.kind=prenorm")
    assert same.model == presets.get_preset("tiny").model


@pytest.mark.parametrize(
    "flag, expected",
    [
        ("--model.num_layer=3", ["--model.num_layer", "'num_layers'", "hidden_size"]),
        ("--modle.num_layers=3", ["--modle.num_layers", "'model'", "optimizer"]),
        ("--train.steps=abc", ["--train.steps='abc'", "expected an integer"]),
        ("--model.tie_word_embeddings=maybe", ["'maybe'", "expected a boolean"]),
        ("--optimizer.b1=fast", ["--optimizer.b1='fast'", "expected a number"]),
        ("--data.mqar_key_range=1,2,3", ["expected 2 comma-separated values"]),
        ("--model.attention.gqa.rope=1", ["model.attention.gqa.rope is a group", "theta"]),
        ("--model.attention.mla.num_heads=2", ["has no entry 'mla'", "entries: gqa", ".kind="]),
        ("--model.attention.gqa.kind=nope", ["'nope'", "unknown kind", "gqa"]),
        ("--model.num_layers.x=1", ["model.num_layers is a value of type int"]),
        ("--train.steps", ["--train.steps needs a value (int)"]),
        ("--workdr=x", ["unknown flag --workdr", "did you mean --workdir"]),
        ("stray", ["unexpected argument 'stray'"]),
        ("--preset=huge", ["unknown preset 'huge'", "small", "tiny"]),
    ],
)
def test_unknown_or_unparsable_flags_name_flag_value_and_rule(flag, expected):
    with pytest.raises(cli.CLIError) as info:
        cli.parse_args(["--preset", "tiny", flag] if not flag.startswith("--preset") else [flag])
    for fragment in expected:
        assert fragment in str(info.value), (fragment, str(info.value))


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--model.dtype=float64"], "model.dtype='float64' is not one of"),
        (["--model.attention.gqa.num_heads=5"], "gqa.num_heads=5 is not divisible by"),
        (["--optimizer.warmup_steps=20"], "optimizer.warmup_steps=20 must be smaller than"),
        (["--optimizer.learning_rate=nan"], "optimizer.learning_rate=nan must be a positive"),
        (["--optimizer.name=sgd"], "optimizer.name='sgd' is not one of ['adamw', 'muon']"),
        (["--train.mesh=data=2,model=4"], "unknown axes ['model']"),
        (["--model.vocab_size=256"], "model.vocab_size=256 is smaller than"),
        (["--data.seq_len=0"], "data.seq_len=0 must be positive"),
        (["--model.layer_pattern=gqa,other"], "'other', which is not a key of model.attention"),
    ],
)
def test_invalid_values_are_rejected_with_the_rule(flags, expected):
    with pytest.raises(cli.CLIError) as info:
        parse(*flags)
    assert expected in str(info.value)
    assert "invalid configuration (with " + flags[0] in str(info.value)


def test_main_reports_errors_before_compiling(monkeypatch, capsys, tmp_path):
    def no_run(*args, **kwargs):
        raise AssertionError("run() must not be reached")

    monkeypatch.setattr(train_job, "run", no_run)
    assert train_job.main(["--preset", "tiny", "--train.steps=0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "train.steps=0 must be an integer >= 1" in err


def test_batch_that_does_not_fit_the_mesh_is_a_setup_error(capsys, tmp_path):
    argv = ["--preset", "tiny", "--workdir", str(tmp_path), "--data.batch_size=6"]
    assert train_job.main(argv) == 2
    err = capsys.readouterr().err
    assert "data.batch_size=6 is not divisible by the mesh's data x fsdp size 8" in err


def _leaf_paths(node, prefix=""):
    """Dotted paths of every settable leaf of a config dataclass instance."""
    for field in dataclasses.fields(node):
        value = getattr(node, field.name)
        path = f"{prefix}.{field.name}" if prefix else field.name
        if dataclasses.is_dataclass(value):
            yield from _leaf_paths(value, path)
        elif field.name == "attention":
            for label, entry in value.items():
                yield from _leaf_paths(entry, f"{path}.{label}")
        else:
            yield path


def test_help_lists_every_field_with_its_value(capsys):
    assert train_job.main(["--preset", "tiny", "--model.num_layers=3", "--help"]) == 0
    text = capsys.readouterr().out
    config = parse("--model.num_layers=3")
    paths = list(_leaf_paths(config))
    assert len(paths) > 60
    for path in paths:
        assert f"--{path}=" in text, path
    assert "--model.num_layers=3 " in text and "--train.steps=20 " in text
    assert "--model.attention.gqa.rope.theta=10000.0" in text
    assert "--model.attention.LABEL.kind=KIND" in text
    assert "tiny" in text and "hybrid (default)" in text
    assert "peak learning rate" in text  # field descriptions from the docstrings


@pytest.mark.parametrize("name", presets.preset_names())
def test_every_preset_round_trips_through_config_json_and_renders_help(name):
    """config.json is what resume and experiments.generate read back."""
    config = presets.get_preset(name)
    assert run_from_dict(json.loads(json.dumps(run_to_dict(config)))) == config
    text = cli.parse_args(["--preset", name, "--help"]).help_text
    assert f"--train.steps={config.train.steps} " in text


def test_config_round_trips_through_json_dicts():
    hybrid = parse(
        "--model.layer_pattern=gqa,w",
        "--model.attention.w.kind=gqa",
        "--model.attention.w.sliding_window=8",
        "--model.num_layers=4",
    )
    assert run_from_dict(run_to_dict(hybrid)) == hybrid
    with pytest.raises(ConfigError, match="unknown run config sections"):
        run_from_dict({**run_to_dict(hybrid), "extra": {}})


def test_run_config_validates_cross_section_rules():
    with pytest.raises(ConfigError, match="WSD decay steps"):
        RunConfig(
            optimizer=OptimizerConfig(schedule="wsd", warmup_steps=90, decay_fraction=0.2),
            train=TrainConfig(steps=100),
        )
    with pytest.raises(ConfigError, match="run.model must be a ModelConfig"):
        RunConfig(model=DataConfig())
    assert RunConfig(model=ModelConfig(attention={"gqa": GQAConfig(rope=RopeConfig())}))


def test_presets_are_discovered_from_new_modules(tmp_path, monkeypatch):
    (tmp_path / "extra_preset_for_test.py").write_text(
        textwrap.dedent(
            '''
            import dataclasses
            from experiments.presets import register_preset, get_preset

            def wider():
                """tiny, twice as wide."""
                tiny = get_preset("tiny")
                return dataclasses.replace(
                    tiny, model=dataclasses.replace(tiny.model, hidden_size=64)
                )

            register_preset("tiny-wide", wider)
            '''
        )
    )
    monkeypatch.setattr(presets, "__path__", [*presets.__path__, str(tmp_path)])
    monkeypatch.setattr(presets, "_loaded", False)
    monkeypatch.setitem(sys.modules, "experiments.presets.extra_preset_for_test", None)
    monkeypatch.delitem(sys.modules, "experiments.presets.extra_preset_for_test")
    try:
        assert "tiny-wide" in presets.preset_names()
        assert presets.get_preset("tiny-wide").model.hidden_size == 64
        assert presets.preset_description("tiny-wide") == "tiny, twice as wide."
        config = cli.parse_args(["--preset", "tiny-wide", "--model.num_layers=1"]).config
        assert config.model.hidden_size == 64 and config.model.num_layers == 1
    finally:
        presets._PRESETS.pop("tiny-wide", None)
    with pytest.raises(ValueError, match="already registered"):
        presets.register_preset("tiny", lambda: None)


def test_workdir_defaults_to_runs_preset():
    args = cli.parse_args(["--preset", "tiny"])
    assert args.workdir == "runs/tiny" and args.preset == "tiny" and not args.distributed
    args = cli.parse_args(["--workdir", "/tmp/x", "--distributed"])
    assert args.workdir == "/tmp/x" and args.preset == "hybrid" and args.distributed
