import json

import pytest
import yaml

from fusion.config import RunSpec, load_spec, parse_spec
from fusion.errors import FusionError

MINIMAL = {
    "name": "t",
    "store": "runs/t",
    "models": {"target": {"name": "tgt", "path": "m/t"}, "sources": [{"name": "a", "path": "m/a"}]},
    "corpus": {"path": "c.jsonl"},
}


def test_minimal_spec_gets_defaults():
    spec = parse_spec(MINIMAL)
    assert spec.train.lam == 0.9 and spec.align.mode == "default" and spec.logits.top_k == 10


def test_fuse_sources_pick_a_subset():
    spec = parse_spec({**MINIMAL, "fuse": {"sources": ["a"]}})
    assert spec.fuse.sources == ["a"] and parse_spec(MINIMAL).fuse.sources is None


def test_lambda_is_spelled_lambda_in_yaml():
    spec = parse_spec({**MINIMAL, "train": {"lambda": 0.5}})
    assert spec.train.lam == 0.5
    assert spec.model_dump(by_alias=True)["train"]["lambda"] == 0.5


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
