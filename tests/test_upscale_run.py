"""Depth up-scaling as the target's initialisation in a run spec: "up-scale, then fuse" is one run."""

from __future__ import annotations

import pytest
import torch

from fusion import models
from fusion.config import parse_spec
from fusion.errors import FusionError
from fusion.launch_local import run_all
from fusion.pipeline import open_run
from fusion.stages import train

pytest.importorskip("mergekit")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSION_CACHE_DIR", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_spec_refuses_bad_init_keys(micro, tmp_path):
    with pytest.raises(FusionError, match="unknown key 'models.target.init.upscale.layers'"):
        parse_spec(micro.spec(tmp_path / "s", **{"models.target.init": {"upscale": {"drop": 0, "layers": 2}}}))
    with pytest.raises(FusionError, match="models.target.init.upscale.drop"):
        parse_spec(micro.spec(tmp_path / "s", **{"models.target.init": {"upscale": {"drop": -1}}}))
    spec = micro.spec(tmp_path / "s")
    spec["models"]["sources"][0]["init"] = {"upscale": {"drop": 0}}
    with pytest.raises(FusionError, match="unknown key 'models.sources.0.init'"):
        parse_spec(spec)
    run = open_run(parse_spec(micro.spec(tmp_path / "s", **{"models.target.init": {"upscale": {"drop": 1}}})))
    with pytest.raises(FusionError, match="models.target.init.upscale: .*drop must be in 0..0"):
        run.preflight()  # checked on the base's config, before anything is built
    with pytest.raises(FusionError, match="models.target.init.upscale: .*drop must be in 0..0"):
        models.model_dir(run.target)


def test_upscale_then_fuse_is_one_run(micro, tmp_path):
    plain = open_run(parse_spec(micro.spec(tmp_path / "plain")))
    run = open_run(parse_spec(micro.spec(tmp_path / "up", **{"models.target.init": {"upscale": {"drop": 0}}})))
    # same tokenizer, so the same split; the target's identity says how it is built, without building it
    assert run.model_identity("target")["init"] == {"upscale": {"drop": 0}}
    assert run.hash("split", "train") == plain.hash("split", "train")
    assert run.hash("logits", "target") != plain.hash("logits", "target")
    run.preflight()
    assert not (tmp_path / "cache" / "upscaled").exists()
    # the micro target has 1 layer: drop 0 gives 2 copies of it
    base = models.load_model(plain.target).state_dict()
    up = models.load_model(run.target).state_dict()
    for layer in (0, 1):
        assert torch.equal(up[f"model.layers.{layer}.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    run_all(run, ["split", "vocab", "logits", "align", "fuse", "train"])
    fused = train.model_folder(run, tmp_path / "fused")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(fused))
    assert model.config.num_hidden_layers == 2
    trained = model.state_dict()["model.layers.1.mlp.up_proj.weight"]
    assert not torch.equal(trained, up["model.layers.1.mlp.up_proj.weight"])  # training moved it
