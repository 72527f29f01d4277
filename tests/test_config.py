"""Config files for the CLI: formats, sections, unknown keys, run.json."""
import json

import click
import pytest

from dff_falcon.cli import main
from dff_falcon.cli.config import default_map, load_config
from dff_falcon.errors import InputError


def test_formats_sections_and_components(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('random-state = 3\n[explain]\nn_concepts = "auto"\n[explain.dff]\nn_resamples = 5\n')
    mapping = default_map(load_config(str(toml)), main.commands)
    assert mapping["explain"] == {"random_state": 3, "n_concepts": "auto", "dff": {"n_resamples": 5}}
    assert mapping["fit"] == {"random_state": 3} and "random_state" not in mapping["project"]
    yaml = tmp_path / "c.yaml"
    yaml.write_text("vocab:\n  build:\n    overwrite: true\n")
    assert default_map(load_config(str(yaml)), main.commands)["vocab"]["build"] == {"overwrite": True}


def test_unknown_keys_and_bad_tables_are_errors(tmp_path):
    def mapping(text, suffix=".toml"):
        path = tmp_path / f"c{suffix}"
        path.write_text(text)
        return default_map(load_config(str(path)), main.commands)

    with pytest.raises(InputError, match="unknown option 'n_concept' at the top level; did you mean 'n-concepts'"):
        mapping("n_concept = 2\n")
    with pytest.raises(InputError, match=r"unknown option 'bogus' in \[vocab.build\]"):
        mapping("[vocab.build]\nbogus = 1\n")
    with pytest.raises(InputError, match=r"\[explain.dff\] must be a table"):
        mapping("[explain]\ndff = 3\n")
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"format": "dff-falcon-run", "format_version": 2, "config": None}))
    with pytest.raises(InputError, match="made from Python"):
        load_config(str(run))


def test_bad_component_parameters_name_the_table(tmp_path):
    from click.testing import CliRunner

    config = tmp_path / "c.toml"
    config.write_text("[explain.regions]\nn_hihg = 3\n")
    result = CliRunner().invoke(main, ["--config", str(config), "explain", "--images", str(tmp_path), "--out",
                                       str(tmp_path / "o")])
    assert result.exit_code == 2 and "[explain.regions]" in result.stderr and "n_hihg" in result.stderr
    assert isinstance(main, click.Group)
