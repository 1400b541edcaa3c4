"""The target model, its optimizer and its learning-rate schedule, driven by plain torch (one
process) or by DeepSpeed (ZeRO stage 2 or 3, data parallel over torchrun's ranks).

Both engines apply the same optimizer and schedule: torch.optim.AdamW and a LambdaLR with
linear warm-up, then cosine decay to lr * min_lr_ratio (`lr_factor`). DeepSpeed receives them
as client objects with a config built here that has no "optimizer" or "scheduler" block (the
spec refuses one in `train.deepspeed`), so no config can replace them, as the original
FuseLLM's config silently replaced its cosine schedule. `build` checks that DeepSpeed drives
exactly these objects; `describe` records what is applied, and the trainer logs the learning
rate read back from the optimizer at every step.

Loss scale: the trainer passes `backward` each micro-batch's summed loss divided by the global
batch's token count, so the sum over micro-batches and ranks is the global token-weighted mean.
DeepSpeed divides by the accumulation steps (turned off here) and averages gradients over ranks
(undone by multiplying by the world size).

Master weights are fp32 in both engines; bf16 (on CUDA) is autocast for torch and DeepSpeed's
bf16 mode, whose fp32 master copy lives in the optimizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from fusion import models
from fusion.config import TrainSpec
from fusion.errors import FusionError
from fusion.run import Run
from fusion.training.distributed import World


def lr_factor(step: int, total: int, spec: TrainSpec) -> float:
    """Learning rate of optimizer step `step` (0-based) as a multiple of train.lr."""
    if step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    progress = min(1.0, (step - spec.warmup_steps) / max(1, total - spec.warmup_steps))
    return spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Layout:
    per_rank: int  # blocks per rank and optimizer step
    micro: int  # blocks per forward pass
    accumulation: int  # forward passes per rank and optimizer step


def batch_layout(spec: TrainSpec, world_size: int) -> Layout:
    if spec.batch_size % world_size:
        raise FusionError(f"train.batch_size={spec.batch_size} is not divisible by the world size {world_size}")
    per_rank = spec.batch_size // world_size
    micro = spec.micro_batch_size or per_rank
    if per_rank % micro:
        raise FusionError(
            f"train.micro_batch_size={micro} does not divide the {per_rank} blocks per rank "
            f"(train.batch_size={spec.batch_size} over {world_size} rank(s))"
        )
    return Layout(per_rank, micro, per_rank // micro)


def resolve_precision(spec: TrainSpec, device: str) -> str:
    if spec.precision == "auto":
        return "bf16" if device.startswith("cuda") else "fp32"
    if spec.precision == "bf16" and not device.startswith("cuda"):
        raise FusionError("train.precision=bf16 needs a CUDA device; on CPU training runs in fp32 (precision: auto)")
    return spec.precision


def deepspeed_config(spec: TrainSpec, layout: Layout, precision: str) -> dict:
    config = {
        "train_batch_size": spec.batch_size,
        "train_micro_batch_size_per_gpu": layout.micro,
        "gradient_accumulation_steps": layout.accumulation,
        "gradient_clipping": spec.max_grad_norm,
        "zero_optimization": {"stage": spec.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        # a client torch optimizer: nothing compiled at run time, the same AdamW as the torch engine
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
    }
    for key, value in spec.deepspeed.items():  # owned keys were refused by the spec
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


@dataclass
class Engine:
    kind: str  # "torch" | "deepspeed"
    module: object  # the transformers model
    optimizer: object  # torch.optim.AdamW (DeepSpeed wraps it; this is the object that steps)
    scheduler: object  # torch.optim.lr_scheduler.LambdaLR on `optimizer`
    world: World
    layout: Layout
    precision: str
    spec: TrainSpec
    total_steps: int
    ds: object | None = None  # the DeepSpeed engine
    ds_config: dict | None = None
    hf_ds_config: object | None = None  # while alive, transformers loads ZeRO-3 models partitioned


def build(run: Run, world: World, total: int) -> Engine:
    import torch

    spec = run.spec.train
    layout = batch_layout(spec, world.size)
    precision = resolve_precision(spec, world.device)
    torch.manual_seed(spec.seed)
    ds_config = hf_ds_config = None
    if spec.engine == "deepspeed":
        ds_config = deepspeed_config(spec, layout, precision)
        if spec.zero_stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            hf_ds_config = HfDeepSpeedConfig(ds_config)  # from_pretrained now loads straight into partitions
    module = models.load_model(run.target, None if spec.engine == "deepspeed" else world.device, dtype="float32")
    module.train()
    module.config.use_cache = False
    if spec.gradient_checkpointing:
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(module.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)

    def schedule(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, total, spec))

    if spec.engine == "torch":
        return Engine("torch", module, optimizer, schedule(optimizer), world, layout, precision, spec, total)

    import deepspeed

    ds, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=schedule, config=ds_config)
    scheduler = ds.lr_scheduler
    adopted = isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR) and scheduler.optimizer is optimizer
    if ds.basic_optimizer is not optimizer or not adopted:
        raise RuntimeError(
            f"DeepSpeed did not adopt the trainer's optimizer and schedule (it uses "
            f"{type(ds.basic_optimizer).__name__}, {type(scheduler).__name__}); refusing to train with a schedule "
            f"nobody asked for"
        )
    return Engine(
        "deepspeed", module, optimizer, scheduler, world, layout, precision, spec, total, ds, ds_config, hf_ds_config
    )


def describe(engine: Engine) -> dict:
    """What is applied: engine, precision, batch layout, optimizer, schedule, DeepSpeed config."""
    spec, group = engine.spec, engine.optimizer.param_groups[0]
    return {
        "engine": engine.kind,
        "world_size": engine.world.size,
        "device": engine.world.device,
        "precision": engine.precision,
        "zero_stage": spec.zero_stage if engine.ds is not None else None,
        "gradient_checkpointing": spec.gradient_checkpointing,
        "batch": {"global": spec.batch_size, "per_rank": engine.layout.per_rank, "micro": engine.layout.micro,
                  "accumulation": engine.layout.accumulation},
        "optimizer": {
            "class": f"{type(engine.optimizer).__module__}.{type(engine.optimizer).__name__}",
            "stepped_by": type(engine.ds.optimizer).__name__ if engine.ds is not None else None,
            "betas": list(group["betas"]),
            "eps": group["eps"],
            "weight_decay": group["weight_decay"],
        },
        "schedule": {
            "class": f"{type(engine.scheduler).__module__}.{type(engine.scheduler).__name__}",
            "shape": "linear warm-up, then cosine decay",
            "peak_lr": spec.lr,
            "warmup_steps": spec.warmup_steps,
            "min_lr": spec.lr * spec.min_lr_ratio,
            "total_steps": engine.total_steps,
        },
        "deepspeed_config": engine.ds_config,
    }


# ---- one optimizer step ----------------------------------------------------------------------------
def forward(engine: Engine, batch):
    """Logits [B, W, V] of a batch (data.Batch), shifted so that position i predicts label i."""
    import torch

    inputs, mask = batch.inputs.to(engine.world.device), batch.mask.to(engine.world.device)
    model = engine.ds if engine.ds is not None else engine.module
    autocast = engine.ds is None and engine.precision == "bf16"
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        return model(input_ids=inputs, attention_mask=mask).logits[:, :-1]


def backward(engine: Engine, loss, last: bool) -> None:
    """Accumulate the gradient of one micro-batch; `last`: the step's final micro-batch."""
    if engine.ds is None:
        loss.backward()
        return
    engine.ds.backward(loss * engine.world.size, scale_wrt_gas=False)
    if not last:
        engine.ds.step()  # counts the micro-batch; DeepSpeed steps the optimizer at the boundary only
    elif not engine.ds.is_gradient_accumulation_boundary():
        raise RuntimeError("DeepSpeed's accumulation boundary does not match the trainer's batch layout")


def current_lr(engine: Engine) -> float:
    """The learning rate the optimizer applies at its next step, read from the optimizer itself."""
    return float(engine.optimizer.param_groups[0]["lr"])


def step(engine: Engine) -> float:
    """Clip, step the optimizer and the schedule, clear gradients; returns the gradient norm."""
    import torch

    if engine.ds is None:
        norm = torch.nn.utils.clip_grad_norm_(engine.module.parameters(), engine.spec.max_grad_norm)
        engine.optimizer.step()
        engine.scheduler.step()
        engine.optimizer.zero_grad(set_to_none=True)
        return float(norm)
    engine.ds.step()
    norm = engine.ds.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


# ---- state -----------------------------------------------------------------------------------------
def save(engine: Engine, folder: Path) -> None:
    """This rank's engine state as files in a local folder (every rank calls it)."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    if engine.ds is not None:
        engine.ds.save_checkpoint(str(folder), tag="state", save_latest=False)
        return
    state = {
        "model": engine.module.state_dict(),
        "optimizer": engine.optimizer.state_dict(),
        "scheduler": engine.scheduler.state_dict(),
    }
    torch.save(state, folder / "state.pt")


def load(engine: Engine, folder: Path) -> None:
    import torch

    if engine.ds is not None:
        path, _ = engine.ds.load_checkpoint(
            str(folder), tag="state", load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise FusionError(f"train: DeepSpeed found no checkpoint state in {folder}")
        return
    state = torch.load(folder / "state.pt", map_location=engine.world.device, weights_only=False)
    engine.module.load_state_dict(state["model"])
    engine.optimizer.load_state_dict(state["optimizer"])
    engine.scheduler.load_state_dict(state["scheduler"])


def full_state_dict(engine: Engine) -> dict | None:
    """The whole model's weights on rank 0 (None elsewhere). Under ZeRO-3 every rank holds a
    slice of each weight, so each one is gathered in turn (every rank must call this)."""
    module = engine.module
    if engine.ds is None or engine.spec.zero_stage < 3:
        return {k: v.detach().cpu() for k, v in module.state_dict().items()} if engine.world.main else None
    import deepspeed

    state = {}
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            if engine.world.main:
                state[name] = param.detach().cpu().clone()
    if not engine.world.main:
        return None
    params = set(state) | {n for n, _ in module.named_parameters(remove_duplicate=False)}
    for name, value in module.state_dict().items():  # persistent buffers are not partitioned
        if name not in params:
            state[name] = value.detach().cpu()
    return state
