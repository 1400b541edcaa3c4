import json
from pathlib import Path

import pytest
import yaml

from fusion.config import RunSpec, load_spec, parse_spec
from fusion.errors import FusionError

JOBS = sorted((Path(__file__).resolve().parents[1] / "jobs").glob("*.yaml"))

MINIMAL = {
    "name": "t",
    "store": "runs/t",
    "models": {"target": {"name": "tgt", "path": "m/t"}, "sources": [{"name": "a", "path": "m/a"}]},
    "corpus": {"path": "c.jsonl"},
}


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.name)
def test_every_job_file_is_a_valid_spec(job):
    """The schema alone: no model is built or loaded, no path is looked at."""
    spec = load_spec(job)
    assert spec.name == job.stem


def test_minimal_spec_gets_defaults():
    spec = parse_spec(MINIMAL)
    assert spec.train.lam == 0.5 and spec.align.mode == "default" and spec.logits.top_k == 10
    assert spec.logits.method == "sampled" and spec.fuse.function == "mince" and spec.train.tail == "bucket"


def test_fuse_sources_pick_a_subset():
    spec = parse_spec({**MINIMAL, "fuse": {"sources": ["a"]}})
    assert spec.fuse.sources == ["a"] and parse_spec(MINIMAL).fuse.sources is None


def test_lambda_is_spelled_lambda_in_yaml():
    spec = parse_spec({**MINIMAL, "train": {"lambda": 0.7}})
    assert spec.train.lam == 0.7
    assert spec.model_dump(by_alias=True)["train"]["lambda"] == 0.7


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"trian": {}}, "unknown key 'trian'"),
        ({"train": {"lr": "fast"}}, "key 'train.lr'"),
        ({"train": {"lambda": 1.5}}, "key 'train.lambda'"),
        ({"align": {"mode": "fuzzy"}}, "key 'align.mode'"),
        ({"models": {"target": {"name": "tgt", "path": "x"}, "sources": []}}, "key 'models.sources'"),
        ({"models": {"target": {"name": "a", "path": "x"}, "sources": [{"name": "a", "path": "y"}]}}, "repeated: a"),
        ({"name": "Has Spaces"}, "key 'name'"),
        ({"fuse": {"sources": ["b"]}}, "fuse.sources: 'b' is not a source model"),
        ({"fuse": {"sources": []}}, "key 'fuse.sources'"),
    ],
)
def test_bad_keys_are_named(patch, message):
    with pytest.raises(FusionError, match=message.replace(".", r"\.")):
        parse_spec({**MINIMAL, **patch})


def test_missing_key_is_named():
    data = dict(MINIMAL)
    del data["corpus"]
    with pytest.raises(FusionError, match="missing key 'corpus'"):
        parse_spec(data)


def test_malformed_yaml_is_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: t\nmodels: [unclosed\n")
    with pytest.raises(FusionError) as err:
        load_spec(path)
    assert "malformed YAML" in str(err.value) and "\n" not in str(err.value)


def test_overrides_keep_types(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    spec = load_spec(path, ["train.lr=1e-4", "train.lambda=0.7", "logits.top_k=5"])
    assert spec.train.lr == 1e-4 and spec.train.lam == 0.7 and spec.logits.top_k == 5


def test_json_schema_is_strict():
    schema = RunSpec.model_json_schema(by_alias=True)
    assert schema["additionalProperties"] is False
    json.dumps(schema)


def test_a_bad_set_key_is_blamed_on_the_set_option_not_the_file(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    with pytest.raises(FusionError) as err:
        load_spec(path, ["train.lr=1e-4", "train.lrr=1"])
    assert str(err.value) == "--set train.lrr=1: unknown key 'train.lrr'"
    with pytest.raises(FusionError, match=r"^--set logits.top_k=ten: key 'logits.top_k'"):
        load_spec(path, ["logits.top_k=ten"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**MINIMAL, "train": {"lrr": 1}}))
    with pytest.raises(FusionError, match=r"bad.yaml: unknown key 'train.lrr'"):
        load_spec(bad, ["train.lr=1e-4"])


@pytest.mark.parametrize("name", ["Has Spaces", "-leading", "x" * 41, "under_score"])
def test_a_bad_name_is_explained_in_words_not_a_regex(name):
    with pytest.raises(FusionError) as err:
        parse_spec({**MINIMAL, "name": name})
    message = str(err.value)
    assert f"key 'name': {name!r} is not a valid value" in message
    assert "lowercase letters, digits and '-'" in message and "^[" not in message


def test_a_bad_environment_variable_name_is_explained_in_words():
    with pytest.raises(FusionError) as err:
        parse_spec({**MINIMAL, "store_options": {"access_key_id_env": "1-KEY", "secret_access_key_env": "S"}})
    assert "store_options.access_key_id_env" in str(err.value) and "environment variable's name" in str(err.value)
    assert "^[" not in str(err.value)
