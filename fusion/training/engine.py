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
from typing import ClassVar
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


# ---- the engines ------------------------------------------------------------------------------------
@dataclass
class Engine:
    """What both engines hold. Each engine (train.engine, resolved once by `build` through
    ENGINES) says how it runs a forward pass, accumulates gradients, steps, saves and loads:
    TorchEngine in this process, DeepSpeedEngine over torchrun's ranks with ZeRO-2/3.

    What launchers and checkpoints ask of an engine before or besides building one are class
    attributes: `multi_process` (it runs in torchrun's ranks, so a pod starts torchrun first;
    else it trains in one plain process) and `state_per_rank` (its checkpoint state is split by
    rank, so a checkpoint resumes only in a world of the same size)."""

    kind: ClassVar[str]
    multi_process: ClassVar[bool]
    state_per_rank: ClassVar[bool]
    module: object  # the transformers model
    optimizer: object  # torch.optim.AdamW (DeepSpeed wraps it; this is the object that steps)
    scheduler: object  # torch.optim.lr_scheduler.LambdaLR on `optimizer`
    world: World
    layout: Layout
    precision: str
    spec: TrainSpec
    total_steps: int

    def current_lr(self) -> float:
        """The learning rate the optimizer applies at its next step, read from the optimizer itself."""
        return float(self.optimizer.param_groups[0]["lr"])

    def describe(self) -> dict:
        """What is applied: engine, precision, batch layout, optimizer, schedule, DeepSpeed config."""
        spec, group = self.spec, self.optimizer.param_groups[0]
        return {
            "engine": self.kind,
            "world_size": self.world.size,
            "device": self.world.device,
            "precision": self.precision,
            "zero_stage": self.zero_stage,
            "gradient_checkpointing": spec.gradient_checkpointing,
            "batch": {"global": spec.batch_size, "per_rank": self.layout.per_rank, "micro": self.layout.micro,
                      "accumulation": self.layout.accumulation},
            "optimizer": {
                "class": f"{type(self.optimizer).__module__}.{type(self.optimizer).__name__}",
                "stepped_by": self.stepped_by,
                "betas": list(group["betas"]),
                "eps": group["eps"],
                "weight_decay": group["weight_decay"],
            },
            "schedule": {
                "class": f"{type(self.scheduler).__module__}.{type(self.scheduler).__name__}",
                "shape": "linear warm-up, then cosine decay",
                "peak_lr": spec.lr,
                "warmup_steps": spec.warmup_steps,
                "min_lr": spec.lr * spec.min_lr_ratio,
                "total_steps": self.total_steps,
            },
            "deepspeed_config": self.ds_config,
        }

    zero_stage = None  # the ZeRO stage applied (DeepSpeed only)
    stepped_by = None  # the class that steps the optimizer, where it is not the optimizer itself
    ds_config = None  # the DeepSpeed config applied

    # what each engine implements
    def forward(self, batch): ...  # logits [B, W, V] of a batch (data.Batch), position i predicts label i

    def backward(self, loss, last: bool) -> None: ...  # accumulate one micro-batch; `last`: the step's final one

    def step(self) -> float: ...  # clip, step optimizer and schedule, clear gradients; the gradient norm

    def save(self, folder: Path) -> None: ...  # this rank's state as files in a local folder (every rank calls it)

    def load(self, folder: Path) -> None: ...

    def full_state_dict(self) -> dict | None: ...  # the whole model's weights on rank 0 (None elsewhere)


@dataclass
class TorchEngine(Engine):
    kind = "torch"
    multi_process = False
    state_per_rank = False

    def forward(self, batch):
        import torch

        inputs, mask = batch.inputs.to(self.world.device), batch.mask.to(self.world.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            return self.module(input_ids=inputs, attention_mask=mask).logits[:, :-1]

    def backward(self, loss, last: bool) -> None:
        loss.backward()

    def step(self) -> float:
        import torch

        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.spec.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def save(self, folder: Path) -> None:
        import torch

        folder.mkdir(parents=True, exist_ok=True)
        state = {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }
        torch.save(state, folder / "state.pt")

    def load(self, folder: Path) -> None:
        import torch

        state = torch.load(folder / "state.pt", map_location=self.world.device, weights_only=False)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def full_state_dict(self) -> dict | None:
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()} if self.world.main else None


@dataclass
class DeepSpeedEngine(Engine):
    kind = "deepspeed"
    multi_process = True
    state_per_rank = True  # ZeRO partitions
    ds: object = None  # the DeepSpeed engine
    ds_config: dict | None = None
    hf_ds_config: object | None = None  # while alive, transformers loads ZeRO-3 models partitioned

    @property
    def zero_stage(self) -> int:
        return self.spec.zero_stage

    @property
    def stepped_by(self) -> str:
        return type(self.ds.optimizer).__name__

    def forward(self, batch):
        inputs, mask = batch.inputs.to(self.world.device), batch.mask.to(self.world.device)
        return self.ds(input_ids=inputs, attention_mask=mask).logits[:, :-1]  # bf16: DeepSpeed's own mode

    def backward(self, loss, last: bool) -> None:
        self.ds.backward(loss * self.world.size, scale_wrt_gas=False)
        if not last:
            self.ds.step()  # counts the micro-batch; DeepSpeed steps the optimizer at the boundary only
        elif not self.ds.is_gradient_accumulation_boundary():
            raise RuntimeError("DeepSpeed's accumulation boundary does not match the trainer's batch layout")

    def step(self) -> float:
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.ds.save_checkpoint(str(folder), tag="state", save_latest=False)

    def load(self, folder: Path) -> None:
        path, _ = self.ds.load_checkpoint(str(folder), tag="state", load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise FusionError(f"train: DeepSpeed found no checkpoint state in {folder}")

    def full_state_dict(self) -> dict | None:
        """Under ZeRO-3 every rank holds a slice of each weight, so each one is gathered in turn
        (every rank must call this)."""
        module = self.module
        if self.spec.zero_stage < 3:
            return {k: v.detach().cpu() for k, v in module.state_dict().items()} if self.world.main else None
        import deepspeed

        state = {}
        for name, param in module.named_parameters():
            with deepspeed.zero.GatheredParameters([param]):
                if self.world.main:
                    state[name] = param.detach().cpu().clone()
        if not self.world.main:
            return None
        params = set(state) | {n for n, _ in module.named_parameters(remove_duplicate=False)}
        for name, value in module.state_dict().items():  # persistent buffers are not partitioned
            if name not in params:
                state[name] = value.detach().cpu()
        return state


# ---- building one ------------------------------------------------------------------------------------
def _model_and_optimizer(run: Run, device: str | None, total: int):
    """The target in fp32 (on `device`; None: where DeepSpeed puts it), AdamW and the schedule's maker."""
    import torch

    spec = run.spec.train
    module = models.load_model(run.target, device, dtype="float32")
    module.train()
    module.config.use_cache = False
    if spec.gradient_checkpointing:
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(module.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)

    def schedule(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, total, spec))

    return module, optimizer, schedule


def _build_torch(run: Run, world: World, total: int, layout: Layout, precision: str) -> TorchEngine:
    module, optimizer, schedule = _model_and_optimizer(run, world.device, total)
    return TorchEngine(module, optimizer, schedule(optimizer), world, layout, precision, run.spec.train, total)


def _build_deepspeed(run: Run, world: World, total: int, layout: Layout, precision: str) -> DeepSpeedEngine:
    import torch

    spec = run.spec.train
    ds_config, hf_ds_config = deepspeed_config(spec, layout, precision), None
    if spec.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds_config = HfDeepSpeedConfig(ds_config)  # from_pretrained now loads straight into partitions
    module, optimizer, schedule = _model_and_optimizer(run, None, total)
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
    return DeepSpeedEngine(module, optimizer, scheduler, world, layout, precision, spec, total, ds, ds_config, hf_ds_config)


ENGINES = {"torch": TorchEngine, "deepspeed": DeepSpeedEngine}  # train.engine -> its engine
_BUILDERS = {TorchEngine: _build_torch, DeepSpeedEngine: _build_deepspeed}


def engine_of(spec: TrainSpec) -> type[Engine]:
    """The engine class train.engine names (its class attributes answer without building one)."""
    return ENGINES[spec.engine]


def build(run: Run, world: World, total: int) -> Engine:
    """The engine train.engine names, with the batch layout and precision of this world."""
    import torch

    spec = run.spec.train
    layout = batch_layout(spec, world.size)
    precision = resolve_precision(spec, world.device)
    torch.manual_seed(spec.seed)
    return _BUILDERS[engine_of(spec)](run, world, total, layout, precision)
