"""A mixture of experts from same-architecture models: `fusion moe CONFIG OUT`.

CONFIG is a mergekit-moe configuration, built in-process by mergekit's Python API, offline, on
local folders: a Mixtral-style model (MixtralForCausalLM) from Llama or Mistral experts. The
attention, embeddings and norms come from `base_model`; every layer's MLP becomes E experts,
the MLPs of the expert models, and a router picks `experts_per_token` of them per token. The
routers start from hidden states of per-expert prompts (`gate_mode: hidden`: the base's mean
hidden state over each expert's `positive_prompts`, per layer, normalised), from their token
embeddings (`cheap_embed`) or at random.

One key is this project's, not mergekit's: `train_gates` trains the routers briefly, nothing
else (every other weight frozen), with the plain next-token loss on text files:

    base_model: models/target
    gate_mode: hidden
    dtype: float32
    experts_per_token: 2
    experts:
      - {source_model: models/exp-prose, positive_prompts: ["The President said ..."]}
      - {source_model: models/exp-code, positive_prompts: ["def parse(self, text):"]}
    train_gates: {text: [data/mix.txt], steps: 50, lr: 1.0e-3, batch: 8}

Cost. Building reads every expert once and runs the base on the prompts; the output holds the
base's non-MLP weights plus E MLPs per layer. Inference runs the attention once and
`experts_per_token` MLPs per token: more than one model's compute where k > 1, less than an
ensemble of E models (which runs E whole models per token). `--eval-text FILE` reports bits
per byte of text under the built model (the eval stage's measure).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import uuid
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fusion.errors import FusionError
from fusion.merge import read_config, replace_folder, require_mergekit
from fusion.models import load_folder

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class GateTraining(BaseModel):
    """`train_gates`: a short next-token training of the routers alone."""

    model_config = ConfigDict(extra="forbid")
    text: list[str] = Field(min_length=1, description="UTF-8 text files to train on")
    steps: int = Field(50, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    batch: int = Field(8, ge=1)
    seed: int = 0


def parse_config(data: dict, source: str = "moe config"):
    """(mergekit's MoEMergeConfig, GateTraining or None), with the checks mergekit leaves to a
    log line and an exit: unknown keys, local folders, enough experts, prompts where needed."""
    require_mergekit()
    from mergekit.moe.config import MoEMergeConfig

    data = copy.deepcopy(data)
    gates = data.pop("train_gates", None)
    unknown = sorted(set(data) - set(MoEMergeConfig.model_fields))
    if unknown:
        raise FusionError(f"{source}: unknown key '{unknown[0]}' (known: {', '.join(MoEMergeConfig.model_fields)}, train_gates)")
    config = _validate(MoEMergeConfig, data, "", source)
    gates = _validate(GateTraining, gates, "train_gates.", source) if gates is not None else None
    if config.shared_experts:
        raise FusionError(f"{source}: shared_experts are not supported (Mixtral output)")
    if not 1 <= config.experts_per_token <= len(config.experts):
        raise FusionError(f"{source}: experts_per_token must be 1..{len(config.experts)} (the number of experts), "
                          f"got {config.experts_per_token}")
    for i, expert in enumerate(config.experts):
        if config.gate_mode not in ("random", "uniform_random") and not expert.positive_prompts:
            raise FusionError(f"{source}: experts.{i}: gate_mode {config.gate_mode} needs positive_prompts")
    for ref in [config.base_model] + [e.source_model for e in config.experts]:
        folder = Path(ref.model.path)
        if not (folder / "config.json").is_file():
            raise FusionError(f"{source}: model {folder} is not a local model folder (no config.json)")
        kind = json.loads((folder / "config.json").read_text()).get("model_type")
        if kind not in ("llama", "mistral"):
            raise FusionError(f"{source}: model {folder} is a {kind} model; a Mixtral mixture needs Llama or Mistral models")
    if gates is not None:
        for f in gates.text:
            if not Path(f).is_file():
                raise FusionError(f"{source}: train_gates.text: {f} does not exist")
    return config, gates


def _validate(model, data, prefix: str, source: str):
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        key = prefix + ".".join(str(p) for p in first["loc"])
        raise FusionError(f"{source}: key '{key.rstrip('.') or '(top level)'}': {first['msg']}") from None


def build_moe(data: dict, out: str | Path, device: str = "cpu", source: str = "moe config") -> Path:
    """Build the mixture `data` (a mergekit-moe configuration mapping, plus `train_gates`) into
    the folder `out`, whole or not at all."""
    from mergekit.options import MergeOptions
    from mergekit.scripts.moe import build

    config, gates = parse_config(data, source)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        build(config, str(tmp), MergeOptions(quiet=True, write_model_card=False, device=device), device=device)
        if gates is not None:
            train_gates(tmp, gates)
    except SystemExit:  # mergekit logs why and exits
        shutil.rmtree(tmp, ignore_errors=True)
        raise FusionError(f"{source}: mergekit refused the configuration (its log above says why)") from None
    except FusionError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FusionError(f"{source}: mergekit could not build the mixture ({type(e).__name__}: {e})") from None
    (tmp / "moe_config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    replace_folder(tmp, out)
    return out


def router_names(model) -> list[str]:
    return [n for n, _ in model.named_parameters() if n.endswith(".mlp.gate.weight")]


def train_gates(folder: Path, gates: GateTraining, block_tokens: int = 128) -> None:
    """Next-token training of the routers of the mixture in `folder`, in place; all else frozen.
    AdamW at a constant `lr` on random windows of `block_tokens` tokens of the text, each after BOS."""
    import torch
    from transformers import AutoTokenizer

    model = load_folder(folder, "float32", who="moe: train_gates")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    routers = set(router_names(model))
    for name, p in model.named_parameters():
        p.requires_grad_(name in routers)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = []
    for f in gates.text:
        ids += tokenizer(Path(f).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    n_windows = len(ids) // block_tokens
    if n_windows < 1:
        raise FusionError(f"train_gates.text: fewer than {block_tokens} tokens of text")
    windows = torch.tensor(ids[: n_windows * block_tokens]).reshape(n_windows, block_tokens)
    gen = torch.Generator().manual_seed(gates.seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=gates.lr, weight_decay=0.0)
    model.train()
    for _ in range(gates.steps):
        rows = windows[torch.randint(n_windows, (gates.batch,), generator=gen)]
        inputs = torch.cat([torch.full((gates.batch, 1), start), rows], dim=1)
        model(input_ids=inputs, labels=inputs).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval().save_pretrained(str(folder))


# ---- command line ---------------------------------------------------------------------------------
def add_cli(sub) -> None:
    p = sub.add_parser("moe", help="a Mixtral-style mixture of experts from Llama/Mistral experts (mergekit-moe YAML)")
    p.add_argument("config", help="mergekit-moe configuration (YAML), plus optional train_gates")
    p.add_argument("out", help="output model folder (replaced once the mixture is complete)")
    p.add_argument("--eval-text", action="append", default=[], metavar="FILE",
                   help="then print bits per byte of this UTF-8 text under the mixture (repeatable)")
    p.add_argument("--block-tokens", type=int, default=512, metavar="N", help="evaluation text is cut into blocks of this many tokens")
    p.add_argument("--device", default="cpu", metavar="DEVICE", help="where the prompts' hidden states and the router training run: cpu or cuda")


def run_cli(args) -> int:
    from fusion.ensemble import bits_per_byte, load_member, score_texts
    from fusion.corpus import split_text

    texts = []
    for path in args.eval_text:  # read first: a bad file fails before the build
        try:
            texts.append(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise FusionError(f"--eval-text {path}: cannot read UTF-8 text ({e})") from None
    out = build_moe(read_config(args.config), args.out, args.device, source=args.config)
    print(f"[fusion] mixture of experts in {out}")
    if texts:
        member = load_member(out)
        blocks = [b for t in texts for b in split_text(t, [member.tokenizer], args.block_tokens)]
        nll = score_texts([member], blocks)
        print(json.dumps({"model": str(out), "architecture": type(member.model).__name__,
                          "bits_per_byte": round(bits_per_byte(nll, blocks), 6), "blocks": len(blocks),
                          "bytes": sum(len(b.encode("utf-8")) for b in blocks)}))
    return 0
