"""Weight merging (fusion/merging.py) against hand-computed cases and a model round trip."""

import pytest
import torch

from fusion import tiny
from fusion.errors import FusionError
from fusion.merging import linear_merge, merge_folders, ties_merge


def test_linear_merge_is_the_weighted_average():
    a = {"w": torch.tensor([1.0, 2.0]), "pos": torch.tensor([0, 1])}
    b = {"w": torch.tensor([3.0, 6.0]), "pos": torch.tensor([0, 1])}
    out = linear_merge([a, b], [1, 3])
    assert torch.allclose(out["w"], torch.tensor([2.5, 5.0]))
    assert torch.equal(out["pos"], a["pos"])  # integer buffers are copied, not averaged
    with pytest.raises(FusionError):
        linear_merge([a, {"w": torch.zeros(3), "pos": a["pos"]}])


def test_ties_trims_elects_signs_and_averages_the_agreeing_entries():
    base = {"w": torch.zeros(6)}
    t1 = {"w": torch.tensor([4.0, -1.0, 0.1, 2.0, 0.0, -3.0])}
    t2 = {"w": torch.tensor([2.0, 3.0, 0.2, -5.0, 0.0, -1.0])}
    # density 0.5 keeps the 3 largest magnitudes of each task vector:
    # t1 -> [4, 0, 0, 2, 0, -3], t2 -> [2, 3, 0, -5, 0, 0]
    # signs of the sums: [+, +, 0, -, 0, -]; agreeing entries averaged
    out = ties_merge(base, [t1, t2], density=0.5)
    assert torch.allclose(out["w"], torch.tensor([3.0, 3.0, 0.0, -5.0, 0.0, -3.0]))
    # scale multiplies the merged task vector; the base is added back
    shifted = ties_merge({"w": torch.ones(6)}, [{"w": t1["w"] + 1}, {"w": t2["w"] + 1}], density=0.5, scale=0.5)
    assert torch.allclose(shifted["w"], 1 + 0.5 * out["w"])
    # density 1 and one model: the model itself
    assert torch.allclose(ties_merge(base, [t1], density=1.0)["w"], t1["w"])


def test_merged_folder_is_a_loadable_model(tmp_path):
    from transformers import AutoModelForCausalLM

    texts = [t for t, _ in tiny._documents(tiny._module_files(packages=True)[:6])]
    tok = tiny.train_tokenizer("sentencepiece", texts, 300)
    folders = []
    for seed in (0, 1, 2):
        model = tiny.make_model("llama", len(tok), hidden=32, layers=1, tokenizer=tok, seed=seed)
        model.save_pretrained(tmp_path / f"m{seed}")
        tok.save_pretrained(tmp_path / f"m{seed}")
        folders.append(tmp_path / f"m{seed}")
    linear = merge_folders(folders[1:], tmp_path / "linear", "linear")
    ties = merge_folders(folders[1:], tmp_path / "ties", "ties", base=folders[0], density=0.3)
    states = [AutoModelForCausalLM.from_pretrained(f).state_dict() for f in folders]
    merged = AutoModelForCausalLM.from_pretrained(linear).state_dict()
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(merged[name], (states[1][name] + states[2][name]) / 2, atol=1e-6)
    t = AutoModelForCausalLM.from_pretrained(ties)
    assert torch.equal(t.lm_head.weight, t.model.embed_tokens.weight)  # tied weights stay tied
    assert (tmp_path / "ties" / "tokenizer.json").exists()
