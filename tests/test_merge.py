"""Weight merging through mergekit (fusion/merge.py) and depth up-scaling (fusion/upscale.py)
on tiny Llama models built here from transformers configs."""

from __future__ import annotations

import pytest
import torch
import yaml

from fusion import tiny
from fusion.cli import main
from fusion.errors import BAD_INPUT_EXIT_CODE, FusionError
from fusion.merge import TESTED_METHODS, merge_models
from fusion.upscale import layer_plan, upscale

pytest.importorskip("mergekit")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A base and two 'fine-tunes' of it (the base plus seeded noise), 3 layers, one tokenizer."""
    root = tmp_path_factory.mktemp("merge")
    texts = [t for t, _ in tiny._documents(tiny._module_files(packages=True)[:6])]
    tok = tiny.train_tokenizer("sentencepiece", texts, 300)
    base = tiny.make_model("llama", len(tok), hidden=32, layers=3, tokenizer=tok, seed=0)
    out = []
    for i in range(3):
        if i:
            gen = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for p in base.parameters():
                    p.add_(0.02 * torch.randn(p.shape, generator=gen))
        base.save_pretrained(root / f"m{i}")
        tok.save_pretrained(root / f"m{i}")
        out.append(root / f"m{i}")
    return out


def load(folder):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model


def config_for(method: str, folders) -> dict:
    base, a, b = (str(f) for f in folders)
    if method == "linear":
        return {"merge_method": "linear", "dtype": "float32",
                "models": [{"model": a, "parameters": {"weight": 1.0}}, {"model": b, "parameters": {"weight": 3.0}}]}
    if method == "slerp":
        return {"merge_method": "slerp", "dtype": "float32", "base_model": a, "parameters": {"t": 0.5},
                "models": [{"model": a}, {"model": b}]}
    params = {"ties": {"density": 0.5, "weight": 1.0}, "dare_ties": {"density": 0.5, "weight": 1.0}}.get(method)
    models = [{"model": m, **({"parameters": params} if params else {})} for m in (a, b)]
    return {"merge_method": method, "dtype": "float32", "base_model": base, "models": models}


def test_linear_merge_is_the_normalised_weighted_average(folders, tmp_path):
    merged = load(merge_models(config_for("linear", folders), tmp_path / "linear")).state_dict()
    a, b = (load(f).state_dict() for f in folders[1:])
    for name in merged:
        assert torch.allclose(merged[name], (a[name] + 3 * b[name]) / 4, atol=1e-6), name
    assert (tmp_path / "linear" / "tokenizer.json").exists()


@pytest.mark.parametrize("method", [m for m in TESTED_METHODS if m != "linear"])
def test_every_method_writes_a_loadable_model(folders, tmp_path, method):
    merged = load(merge_models(config_for(method, folders), tmp_path / method))
    base, a, b = (load(f).state_dict() for f in folders)
    name = "model.layers.1.mlp.up_proj.weight"
    out = merged.state_dict()[name]
    assert not torch.equal(out, a[name]) and not torch.equal(out, b[name]) and not torch.equal(out, base[name])
    assert torch.isfinite(out).all()
    ids = torch.tensor([[1, 5, 9, 12]])
    assert torch.isfinite(merged(input_ids=ids).logits).all()


def test_merge_command_and_its_bad_input(folders, tmp_path, capsys):
    good = tmp_path / "ties.yaml"
    good.write_text(yaml.safe_dump(config_for("ties", folders)))
    assert main(["merge", str(good), str(tmp_path / "out")]) == 0
    load(tmp_path / "out")
    bad = config_for("linear", folders)
    bad["models"][1]["model"] = str(tmp_path / "nowhere")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    assert main(["merge", str(tmp_path / "bad.yaml"), str(tmp_path / "bad-out")]) == BAD_INPUT_EXIT_CODE
    assert "nowhere is not a local model folder" in capsys.readouterr().err
    assert not (tmp_path / "bad-out").exists()
    with pytest.raises(FusionError, match="unknown key 'modles'"):
        merge_models({"merge_method": "linear", "modles": []}, tmp_path / "x")


def test_upscaled_model_stacks_two_trimmed_copies(folders, tmp_path):
    assert layer_plan(3, 1) == [0, 1, 1, 2]
    assert layer_plan(32, 8) == list(range(24)) + list(range(8, 32))  # SOLAR 10.7B: 48 layers
    with pytest.raises(FusionError, match="drop must be in 0..2"):
        layer_plan(3, 3)
    base = load(folders[0]).state_dict()
    up = load(upscale(folders[0], 1, tmp_path / "up"))
    assert up.config.num_hidden_layers == 4
    state = up.state_dict()
    for new, old in enumerate([0, 1, 1, 2]):
        for leaf in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert torch.equal(state[f"model.layers.{new}.{leaf}"], base[f"model.layers.{old}.{leaf}"])
    assert torch.equal(state["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert torch.equal(state["model.norm.weight"], base["model.norm.weight"])
