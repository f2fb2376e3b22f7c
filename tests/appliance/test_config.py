"""Appliance config: TOML into msgspec Structs, flags on top, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance import DEFAULT_MODEL_ID, ApplianceConfig, LlamaCppModel, load_appliance_config
from federation import ConfigError
from tests.support import run_palisade


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "appliance.toml"
    path.write_text(text)
    return path


def test_no_config_serves_the_default_model_in_region_local(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PALISADE_HOME", str(tmp_path))
    config = load_appliance_config(None)
    assert config.region == "local"
    assert config.port == 8400
    assert [model.id for model in config.models] == [DEFAULT_MODEL_ID]
    assert (
        config.model_path(config.models[0])
        == tmp_path / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    )


def test_full_config_and_flag_overrides(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
node_id = "edge-7"
region = "eu-west"
host = "0.0.0.0"
port = 9000
data_dir = "/srv/palisade"
max_body_bytes = 65536

[[models]]
id = "tiny"
path = "models/tiny.gguf"
context_length = 4096
device_class = "gpu"
max_queue = 8
threads = 2
pricing = { input_per_million = 0.2, output_per_million = 0.6 }
""",
    )
    config = load_appliance_config(path, {"host": "127.0.0.1", "port": 0, "region": None})
    assert (config.host, config.port, config.region, config.node_id) == (
        "127.0.0.1",
        0,
        "eu-west",
        "edge-7",
    )
    model = config.models[0]
    assert isinstance(model, LlamaCppModel)
    assert (model.context_length, model.device_class, model.max_queue, model.threads) == (
        4096,
        "gpu",
        8,
        2,
    )
    assert model.pricing.output_per_million == 0.6
    assert config.model_path(model) == Path("/srv/palisade/models/tiny.gguf")
    assert isinstance(config, ApplianceConfig)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prot = 1\n", "unknown key `prot`"),
        (
            '[[models]]\nid = "a"\npath = "a.gguf"\ncontext_lenght = 5\n',
            "unknown key `models[0].context_lenght`",
        ),
        (
            '[[models]]\nid = "a"\npath = "a.gguf"\ncontext_length = "big"\n',
            "bad value for key `models[0].context_length`: Expected `int`, got `str`",
        ),
        (
            '[[models]]\nid = "a"\npath = "a.gguf"\nengine = "magic"\n',
            "`models[0].engine` = 'magic' is not an engine of this appliance; use one of",
        ),
        ('[[models]]\nid = "a"\n', "missing required key `models[0].path`"),
        ("port = 70000\n", "bad value for key `port`"),
        ('region = "EU West"\n', "bad value for key `region`"),
        ("models = []\n", "bad value for key `models`"),
        ("port = \n", "is not valid TOML"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_appliance_config(write(tmp_path, text))
    assert message in str(caught.value)
    assert "appliance.toml" in str(caught.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist; check the --config path"):
        load_appliance_config(tmp_path / "nope.toml")


def test_serve_with_bad_config_exits_non_zero_with_the_message(tmp_path: Path) -> None:
    path = write(tmp_path, "[[models]]\nid = 'a'\npath = 'a.gguf'\nthreads = 'many'\n")
    result = run_palisade("appliance", "serve", "--config", str(path))
    assert result.returncode == 1
    assert "bad value for key `models[0].threads`" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_with_missing_model_file_says_how_to_fix(tmp_path: Path) -> None:
    path = write(tmp_path, f"[[models]]\nid = 'a'\npath = '{tmp_path / 'missing.gguf'}'\n")
    result = run_palisade("appliance", "serve", "--config", str(path), "--port", "0")
    assert result.returncode == 1
    assert "missing.gguf for `a` does not exist" in result.stderr
    assert "palisade models fetch-default" in result.stderr
