"""Mixtures of experts through mergekit-moe (fusion/moe.py) on tiny Llama models."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from fusion import tiny
from fusion.cli import main
from fusion.errors import BAD_INPUT_EXIT_CODE, FusionError
from fusion.moe import build_moe

pytest.importorskip("mergekit")

PROSE = "The committee met on Tuesday and agreed that the report should be published in the spring."
CODE = "def parse(self, text):\n    for line in text.splitlines():\n        yield line.strip()\n"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A base, two experts (the base with different seeded noise) and a copy of the base."""
    root = tmp_path_factory.mktemp("moe")
    texts = [t for t, _ in tiny._documents(tiny._module_files(packages=True)[:6])]
    tok = tiny.train_tokenizer("sentencepiece", texts, 300)
    out = {}
    for name, noise_seed in (("base", None), ("a", 1), ("b", 2)):
        m = tiny.make_model("llama", len(tok), hidden=32, layers=2, tokenizer=tok, seed=0)
        if noise_seed is not None:
            gen = torch.Generator().manual_seed(noise_seed)
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=gen))
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    shutil.copytree(out["base"], root / "base-copy")
    out["base-copy"] = root / "base-copy"
    (root / "text.txt").write_text("\n\n".join(texts[:4]))
    out["text"] = root / "text.txt"
    return out


def config(folders, experts=("a", "b"), **extra) -> dict:
    return {"base_model": str(folders["base"]), "gate_mode": "hidden", "dtype": "float32", "experts_per_token": 2,
            "experts": [{"source_model": str(folders[e]), "positive_prompts": [p]} for e, p in zip(experts, (PROSE, CODE))],
            **extra}


def load(folder):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model


def test_mixture_loads_as_mixtral_with_the_experts_mlps(folders, tmp_path):
    moe = load(build_moe(config(folders), tmp_path / "moe"))
    assert type(moe).__name__ == "MixtralForCausalLM"
    assert moe.config.num_local_experts == 2 and moe.config.num_experts_per_tok == 2
    state = moe.state_dict()
    base, a, b = (load(folders[n]).state_dict() for n in ("base", "a", "b"))
    for layer in (0, 1):
        p = f"model.layers.{layer}"
        assert torch.equal(state[f"{p}.self_attn.q_proj.weight"], base[f"{p}.self_attn.q_proj.weight"])
        for e, expert in enumerate((a, b)):
            gate_up = torch.cat([expert[f"{p}.mlp.gate_proj.weight"], expert[f"{p}.mlp.up_proj.weight"]])
            assert torch.equal(state[f"{p}.mlp.experts.gate_up_proj"][e], gate_up)
            assert torch.equal(state[f"{p}.mlp.experts.down_proj"][e], expert[f"{p}.mlp.down_proj.weight"])
        router = state[f"{p}.mlp.gate.weight"]  # one normalised hidden-state direction per expert
        assert router.shape == (2, 32) and torch.allclose(router.norm(dim=-1), torch.ones(2), atol=1e-2)
        assert not torch.allclose(router[0], router[1])


def test_a_mixture_of_copies_of_one_model_computes_that_model(folders, tmp_path):
    # every expert is the base: whatever the router does, the normalised top-k sum is the base's MLP
    moe = load(build_moe(config(folders, experts=("base", "base-copy")), tmp_path / "same"))
    base = load(folders["base"])
    ids = torch.tensor([[1, 17, 40, 99, 3, 250]])
    with torch.no_grad():
        assert torch.allclose(moe(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-4)


def test_gate_training_moves_only_the_routers(folders, tmp_path):
    before = load(build_moe(config(folders), tmp_path / "plain")).state_dict()
    gates = {"text": [str(folders["text"])], "steps": 3, "lr": 1e-2, "batch": 2}
    after = load(build_moe(config(folders, train_gates=gates), tmp_path / "trained")).state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == {"model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight"}


def test_moe_command_evaluates_and_refuses_bad_input(folders, tmp_path, capsys):
    path = tmp_path / "moe.yaml"
    path.write_text(yaml.safe_dump(config(folders)))
    assert main(["moe", str(path), str(tmp_path / "out"), "--eval-text", str(folders["text"]), "--block-tokens", "64"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["architecture"] == "MixtralForCausalLM" and 0 < report["bits_per_byte"] < 20
    for bad, message in [
        ({**config(folders), "expert_per_token": 1}, "unknown key 'expert_per_token'"),
        ({**config(folders), "experts_per_token": 3}, "experts_per_token must be 1..2"),
        ({**config(folders), "train_gates": {"text": [str(folders["text"])], "stepz": 3}}, "key 'train_gates.stepz'"),
        ({**config(folders), "base_model": str(tmp_path)},
         "is not a local model folder"),
    ]:
        path.write_text(yaml.safe_dump(bad))
        assert main(["moe", str(path), str(tmp_path / "bad")]) == BAD_INPUT_EXIT_CODE
        assert message in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()
    with pytest.raises(FusionError, match="needs positive_prompts"):
        build_moe({**config(folders), "experts": [{"source_model": str(folders["a"])}] * 2}, tmp_path / "x")
