"""Loading models and tokenizers offline, and the checks that catch a bad model early."""

from __future__ import annotations

import json
import os
from pathlib import Path

from fusion import tiny
from fusion.config import ModelSpec
from fusion.errors import FusionError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: paths are local
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_model(spec: ModelSpec) -> None:
    """Build (once, cached) a built-in `tiny:NAME` model; any other path is a folder already."""
    if spec.path.startswith("tiny:"):
        tiny.model_path(spec.path.removeprefix("tiny:"))


def path_dir(spec: ModelSpec) -> Path:
    """The folder `path` names. A `tiny:NAME` model must have been built (build_model): finding
    its folder never trains one, so hashing a run's models has no side effects."""
    if spec.path.startswith("tiny:"):
        path = tiny.built_path(spec.path.removeprefix("tiny:"))
        if not (path / "config.json").is_file():
            raise FusionError(f"model '{spec.name}': {spec.path} is not built yet (fusion.models.build_model builds it)")
        return path
    path = Path(spec.path).expanduser()
    if path.is_file():
        raise FusionError(
            f"model '{spec.name}': {spec.path} is a file; give the model's folder (the one holding config.json)"
        )
    if not (path / "config.json").is_file():
        raise FusionError(f"model '{spec.name}': {spec.path} is not a model folder (no config.json)")
    return path


def model_dir(spec: ModelSpec) -> Path:
    """The model's local folder: `path_dir`, or for a target with `init: {upscale: ...}` the
    up-scaled model of it (built once, cached; fusion/upscale.py)."""
    path = path_dir(spec)
    init = getattr(spec, "init", None)
    if init is not None:
        from fusion import upscale

        try:
            return upscale.upscaled_dir(path, init.upscale.drop)
        except FusionError as e:
            raise FusionError(f"models.target.init.upscale: {e}") from None
    return path


def tokenizer_dir(spec: ModelSpec) -> Path:
    if spec.tokenizer is None:
        return path_dir(spec)  # an up-scaled target keeps its base's tokenizer files
    path = Path(spec.tokenizer).expanduser()
    if path.is_file():
        raise FusionError(
            f"model '{spec.name}': tokenizer {spec.tokenizer} is a file; give the folder that holds it "
            f"(tokenizer.json, tokenizer_config.json), here {path.parent}"
        )
    if not path.is_dir():
        raise FusionError(f"model '{spec.name}': tokenizer folder {spec.tokenizer} does not exist")
    return path


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    build_model(spec)
    path = tokenizer_dir(spec)
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise FusionError(f"model '{spec.name}': cannot load a tokenizer from {path} ({type(e).__name__}: {e})") from None
    if not getattr(tok, "is_fast", False):
        raise FusionError(f"model '{spec.name}': the tokenizer in {path} is not a fast tokenizer (tokenizer.json needed)")
    return tok


def encode(tokenizer, texts: list[str], offsets: bool = False):
    """Token ids of texts as plain text: no BOS/EOS added, and a literal "<s>" in the text is
    text, not the special token."""
    if not texts:
        return {"input_ids": [], "offset_mapping": []} if offsets else []
    enc = tokenizer(texts, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=offsets)
    return enc if offsets else enc["input_ids"]


def context_token_id(spec: ModelSpec, tokenizer) -> int:
    """The token every block starts from: BOS, or EOS for models trained without a BOS (`spec`:
    anything with the model's `name`, for the message)."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise FusionError(f"model '{spec.name}': its tokenizer has neither a BOS nor an EOS token")


def save_tokenizer(tokenizer, folder: Path, context_id: int) -> None:
    """Save the tokenizer to `folder` so that encoding a text (tokenizer(text), add_special_tokens
    left at its default) starts it with `context_id`, the token every block started from in
    training and evaluation. Many tokenizers do not add their BOS themselves, and a model asked
    without it continues from a context it never saw (often with whitespace only)."""
    from tokenizers import Tokenizer, processors

    tokenizer.save_pretrained(folder)
    if tokenizer("a")["input_ids"][:1] == [context_id]:
        return  # it adds it already
    token = tokenizer.convert_ids_to_tokens(context_id)
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    template = processors.TemplateProcessing(
        single=[token, "$A"], pair=[token, "$A", token, "$B:1"], special_tokens=[(token, context_id)]
    )
    existing = backend.post_processor
    keep = existing is not None and not isinstance(existing, processors.TemplateProcessing)
    backend.post_processor = processors.Sequence([existing, template]) if keep else template  # e.g. ByteLevel offsets
    backend.save(str(Path(folder) / "tokenizer.json"))
    config_path = Path(folder) / "tokenizer_config.json"
    if config_path.is_file():  # tokenizer classes that rebuild their post-processor read these flags
        config = json.loads(config_path.read_text())
        if "add_bos_token" in config and context_id == tokenizer.bos_token_id:
            config["add_bos_token"] = True
            config_path.write_text(json.dumps(config, indent=2) + "\n")


def model_config(spec: ModelSpec) -> dict:
    """The config.json of the folder `path` names (of the base, for a built target)."""
    path = path_dir(spec) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FusionError(f"model '{spec.name}': cannot read {path} ({e})") from None


def logit_width(config: dict) -> int:
    width = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    if not width:
        raise FusionError(f"model config {config.get('_name_or_path', '')} has no vocab_size")
    return int(width)


def max_positions(config: dict) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        if key in config:
            return int(config[key])
    return None


def check_model(spec: ModelSpec, tokenizer, block_tokens: int) -> None:
    """Cheap checks before any expensive work: vocabulary fits logits, blocks fit the context."""
    config = model_config(spec)
    init = getattr(spec, "init", None)
    if init is not None:  # checked on the base: an up-scaled model keeps its vocabulary and positions
        from fusion import upscale

        try:
            upscale.layer_plan(upscale.layer_count(path_dir(spec)), init.upscale.drop)
        except FusionError as e:
            raise FusionError(f"models.target.init.upscale: {e}") from None
    width = logit_width(config)
    if len(tokenizer) > width:
        raise FusionError(
            f"model '{spec.name}': tokenizer has {len(tokenizer)} tokens but the model has only "
            f"{width} logits (vocab_size); they do not belong together"
        )
    longest = max_positions(config)
    if longest is not None and block_tokens + 1 > longest:
        raise FusionError(
            f"model '{spec.name}': split.block_tokens={block_tokens} (+1 for BOS) exceeds the model's "
            f"{longest} positions"
        )
    weights = list(path_dir(spec).glob("*.safetensors")) + list(path_dir(spec).glob("*.bin"))
    if not weights:
        raise FusionError(f"model '{spec.name}': no weights (*.safetensors or *.bin) in {path_dir(spec)}")


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_model(spec: ModelSpec, device: str | None = "cpu", path: Path | None = None, dtype: str | None = None):
    """A run's model (`spec`, or the folder `path`) in eval mode on `device` (None: wherever
    loading put it, e.g. DeepSpeed ZeRO-3 partitions)."""
    if path is None:
        build_model(spec)
        path = model_dir(spec)
    return load_folder(path, dtype or spec.dtype, device, who=f"model '{spec.name}'")


def load_folder(path: Path | str, dtype: str | None = None, device: str | None = "cpu", who: str = "model"):
    """The causal LM in a Hugging Face model folder, in eval mode: weights as `dtype` ("float32",
    "bfloat16", "float16"; None: transformers' default), on `device` (None: where loading put
    them). Every model of the package is loaded here; a folder that does not load is a
    FusionError that starts with `who`."""
    from transformers import AutoModelForCausalLM

    options = {} if dtype is None else {"dtype": torch_dtype(dtype)}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **options)
    except Exception as e:
        raise FusionError(f"{who}: cannot load {path} ({type(e).__name__}: {e})") from None
    return (model if device is None else model.to(device)).eval()


def pick_device(setting: str) -> str:
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise FusionError("logits.device is 'cuda' but no CUDA device is available")
    return setting
