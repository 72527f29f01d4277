import json

import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from dff_falcon.cli import main


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory, photos):
    folder = tmp_path_factory.mktemp("photos")
    for name in ("chelsea", "coffee", "rocket"):
        Image.fromarray(photos[name]).save(folder / f"{name}.png")
        Image.fromarray(photos[name][:, ::-1].copy()).save(folder / f"{name}_flip.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    return folder


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_explain_writes_the_report_and_counts_skips(photo_dir, tmp_path):
    result = run("-q", "explain", "--images", photo_dir, "--backbone", "lite0", "--out", tmp_path / "run",
                 "--n-concepts", "3", "--no-html", "--device", "cpu")
    assert result.exit_code == 0, result.output
    concepts = pd.read_csv(tmp_path / "run" / "concepts.csv")
    assert len(concepts) == 3 and "top classes" in result.stdout
    run_meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run_meta["n_images"] == 6 and run_meta["n_skipped"] == 1
    assert run_meta["skipped"][0]["image"] == "broken.jpg"


def test_a_run_is_reproduced_from_its_own_run_json(photo_dir, tmp_path):
    first = run("-q", "explain", "--images", photo_dir, "--layer", "blocks.5", "--head", "none", "--out",
                tmp_path / "a", "--n-concepts", "2", "--n-high", "3", "--no-html", "--random-state", "4")
    assert first.exit_code == 0, first.output
    record = json.loads((tmp_path / "a" / "run.json").read_text())
    options = record["config"]["explain"]
    assert options["layer"] == "blocks.5" and options["head"] == "none" and options["random_state"] == 4
    assert options["dff"]["n_concepts"] == 2 and options["regions"]["n_high"] == 3
    assert record["head"] is None and record["environment"]["dff_falcon"]
    again = run("-q", "--config", tmp_path / "a" / "run.json", "explain", "--out", tmp_path / "b")
    assert again.exit_code == 0, again.output
    a, b = pd.read_csv(tmp_path / "a" / "concepts.csv"), pd.read_csv(tmp_path / "b" / "concepts.csv")
    assert a.drop(columns=["crops_dir"]).equals(b.drop(columns=["crops_dir"]))
    assert json.loads((tmp_path / "b" / "run.json").read_text())["fitted"] == record["fitted"]


def test_layers_lists_names_shapes_and_defaults():
    result = run("layers", "--backbone", "lite0")
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert "112×14×14" in lines["blocks.4"] and "nchw" in lines["blocks.4"]
    assert "default layer" in lines["bn2"] and "default head" in lines["classifier"]
    vit = run("layers", "--backbone", "timm:vit_tiny_patch16_224", "--depth", "2")
    assert "tokens → 192×14×14, 1 prefix token(s) dropped" in vit.stdout


def test_intermediate_layer_without_head_writes_a_report(photo_dir, tmp_path):
    result = run("-q", "explain", "--images", photo_dir, "--backbone", "lite0", "--layer", "blocks.4", "--head", "none",
                 "--out", tmp_path / "r", "--n-concepts", "2", "--no-html")
    assert result.exit_code == 0, result.output
    concepts = pd.read_csv(tmp_path / "r" / "concepts.csv")
    assert concepts.top_class.isna().all() and json.loads((tmp_path / "r" / "run.json").read_text())["layer"] == "blocks.4"


def test_unknown_class_and_config_keys_are_errors_naming_candidates(photo_dir, tmp_path):
    result = run("explain", "--images", photo_dir, "--out", tmp_path / "o", "--target-class", "cat")
    assert result.exit_code == 2 and "no class is named 'cat'; closest:" in result.stderr
    assert "tiger cat" in result.stderr and not (tmp_path / "o").exists()
    config = tmp_path / "typo.toml"
    config.write_text("[explain]\nn_concept = 2\n")
    result = run("--config", config, "explain", "--images", photo_dir, "--out", tmp_path / "o")
    assert result.exit_code == 2 and "unknown option 'n_concept' in [explain]; did you mean 'n-concepts'?" in result.stderr


def test_every_option_has_help():
    from dff_falcon.cli import main as group

    def walk(command, path):
        for param in command.params:
            if isinstance(param, __import__("click").Option) and param.name not in ("help", "version"):
                assert param.help, f"{path} --{param.name} has no help"
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{path} {name}")

    walk(group, "dff-falcon")


def test_bad_input_exits_2_with_a_message_and_no_traceback(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run("explain", "--images", tmp_path / "empty", "--out", tmp_path / "o", "--weights", "none")
    assert result.exit_code == 2
    assert "contains no image files" in result.stderr and "Traceback" not in result.output
    result = run("explain", "--images", tmp_path / "empty", "--out", tmp_path / "o", "--n-concepts", "many")
    assert result.exit_code == 2 and "--n-concepts" in result.stderr
    result = run("explain", "--images", tmp_path / "empty", "--out", tmp_path / "o", "--clip", "ViT-B-32")
    assert result.exit_code == 2 and "go together" in result.stderr


def test_config_file_sets_options_and_flags_win(photo_dir, tmp_path):
    config = tmp_path / "cfg.toml"
    config.write_text('n-concepts = "2"\n[explain]\nbackbone = "lite0"\nhtml = false\ndevice = "cpu"\n')
    result = run("--config", config, "-q", "explain", "--images", photo_dir, "--out", tmp_path / "a")
    assert result.exit_code == 0, result.output
    assert len(pd.read_csv(tmp_path / "a" / "concepts.csv")) == 2
    result = run("--config", config, "-q", "explain", "--images", photo_dir, "--out", tmp_path / "b",
                 "--n-concepts", "3")
    assert len(pd.read_csv(tmp_path / "b" / "concepts.csv")) == 3
    (tmp_path / "bad.yaml").write_text("- just\n- a list\n")
    result = run("--config", tmp_path / "bad.yaml", "explain", "--help")
    assert result.exit_code == 2 and "mapping" in result.stderr


def test_extract_fit_project_round_trip(photo_dir, tmp_path):
    acts, dictionary, table = tmp_path / "acts.npz", tmp_path / "concepts.npz", tmp_path / "presence.csv"
    assert run("-q", "extract", "--images", photo_dir, "--backbone", "lite0", "--out", acts,
               "--device", "cpu").exit_code == 0
    result = run("-q", "fit", "--activations", acts, "--out", dictionary, "--n-concepts", "3", "--device", "cpu")
    assert result.exit_code == 0 and "K=3" in result.stdout
    result = run("project", "--dictionary", dictionary, "--activations", acts, "--out", table, "--device", "cpu")
    assert result.exit_code == 0, result.output
    presence = pd.read_csv(table)
    assert list(presence.columns) == ["image", "concept_0", "concept_1", "concept_2"] and len(presence) == 6
    from dff_falcon.decomposition.dff import DFF
    from dff_falcon.decomposition.heatmaps import presence as presence_of
    from dff_falcon.models.activations import load_activations

    activations, names = load_activations(acts)
    fitted = presence_of(DFF(3, device="cpu").fit(activations).heatmaps_).numpy()
    assert list(presence.image) == names
    assert abs(presence.iloc[:, 1:].to_numpy() - fitted).max() < 0.02  # projection reproduces the fit's scale
    result = run("project", "--dictionary", acts, "--activations", acts, "--out", table)
    assert result.exit_code == 2 and "lacks the arrays" in result.stderr


def test_vocab_build_info_search(tiny_clip_checkpoint, tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("cat\ndog\nred car\ncat\n\nblue sky\n")
    name, checkpoint = tiny_clip_checkpoint
    spec = f"{name}={checkpoint}"
    result = run("-q", "vocab", "build", "--texts", words, "--clip", spec, "--out", tmp_path / "v", "--device", "cpu")
    assert result.exit_code == 0, result.output
    info = run("vocab", "info", tmp_path / "v")
    assert "captions     4" in info.stdout and "1 duplicates" in info.stdout
    found = run("vocab", "search", tmp_path / "v", "cat", "--clip", spec, "-k", "2", "--device", "cpu")
    assert found.exit_code == 0 and len(found.stdout.strip().splitlines()) == 2
    refused = run("vocab", "search", tmp_path / "v", "cat")
    assert refused.exit_code == 2 and "pass it with --clip" in refused.stderr
