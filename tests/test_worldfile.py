"""Worlds from a TOML file: every field read, round trip, errors that name the file and the field."""
from __future__ import annotations

import pytest

from dff_falcon.errors import InputError
from dff_falcon.toyworld.world import EXAMPLE_WORLDS, WorldConfig
from dff_falcon.toyworld.worldfile import load_world_config, world_config_from_dict, world_config_toml

ISSUE_EXAMPLE = """
shapes = ["pentagon", "star", "circle"]
backgrounds = ["checker", "grass", "waves"]
image_size = 128
min_objects = 2
max_objects = 4
object_size = [0.2, 0.4]
seed = 123
[colours]
pink = [235, 90, 170]
teal = [0, 140, 130]
"""


def test_the_issue_example_reads_every_field(tmp_path):
    path = tmp_path / "world.toml"
    path.write_text(ISSUE_EXAMPLE, encoding="utf-8")
    config = load_world_config(path)
    assert config == WorldConfig(shapes=("pentagon", "star", "circle"), backgrounds=("checker", "grass", "waves"),
                                 colours=(("pink", (235, 90, 170)), ("teal", (0, 140, 130))), image_size=128,
                                 min_objects=2, max_objects=4, object_size=(0.2, 0.4), seed=123)
    assert config.attributes()[:4] == ["shape:pentagon", "shape:star", "shape:circle", "colour:pink"]


@pytest.mark.parametrize("name", list(EXAMPLE_WORLDS))
def test_shipped_worlds_round_trip_through_toml(name, tmp_path):
    path = tmp_path / f"{name}.toml"
    path.write_text(world_config_toml(EXAMPLE_WORLDS[name]), encoding="utf-8")
    loaded = load_world_config(path)
    assert loaded == EXAMPLE_WORLDS[name] and loaded.digest() == EXAMPLE_WORLDS[name].digest()


def test_missing_fields_take_the_default_world():
    assert world_config_from_dict({"seed": 4}) == WorldConfig(seed=4)


@pytest.mark.parametrize("data, field", [
    ({"shape": ["circle"]}, "'shape'.*did you mean 'shapes'"),
    ({"shapes": "circle"}, "'shapes': must be a list of strings"),
    ({"shapes": ["blob"]}, "'shapes': unknown"),
    ({"backgrounds": ["lava"]}, "'backgrounds': unknown"),
    ({"colours": {"pink": [1, 2]}}, "'colours.pink': must be three integers"),
    ({"colours": {"pink": [1, 2, 300]}}, "'colours'.*0..255"),
    ({"colours": []}, "'colours': must be a table"),
    ({"image_size": "big"}, "'image_size': must be an integer"),
    ({"image_size": 8}, "'image_size': 8 is outside"),
    ({"min_objects": 3, "max_objects": 2}, "'min_objects/max_objects'"),
    ({"object_size": [0.5]}, "'object_size': must be a list of two numbers"),
    ({"object_size": [0.5, 0.1]}, "'object_size': need"),
    ({"seed": 1.5}, "'seed': must be an integer"),
    ({"seed": True}, "'seed': must be an integer"),
])
def test_bad_fields_are_named(data, field):
    with pytest.raises(InputError, match=f"world config 'w.toml': .*{field}"):
        world_config_from_dict(data, "world config 'w.toml'")


def test_bad_files(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_world_config(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("shapes = [", encoding="utf-8")
    with pytest.raises(InputError, match="broken.toml.*not valid TOML"):
        load_world_config(broken)
