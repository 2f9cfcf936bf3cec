"""DP-SGD over exactly the trainable parameters of a (PEFT) model, on Opacus' building blocks.

One ``PrivateTrainer`` per local round:

* per-sample gradients of the parameters that have ``requires_grad=True`` only (the caller ran
  ``set_trainable``), by Opacus hooks (``GradSampleHooks`` attached to the model itself, no wrapper module),
  Opacus ghost clipping, or ``lora_fast`` (ours: tensor hooks on the trainable ``nn.Linear`` modules — LoRA
  factors and the head — materialising their tiny per-sample gradients with one batched matmul);
* clipping to ``clip``, Gaussian noise σ·clip, division by the *expected* batch size (Opacus ``DPOptimizer``,
  whose ``add_noise`` draws from our noise source: ``privacy.noise``), then the wrapped optimizer's step;
* batches drawn by Poisson sampling at q = batch/n (``poisson_batches``), empty batches included — an empty
  batch still takes a step (noise only), and is still accounted.

The noise and the sampling come from a ``fedlora.privacy.noise`` source: the OS CSPRNG by default, so neither
can be recomputed by the server; a seeded source only behind the explicit ``privacy.noise=seeded-insecure``.

On ``close()`` (or leaving the ``with`` block) every Opacus hook and attribute is removed from the model, so
the same model object is reused next round in the same process.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedlora.privacy.calibrate import GRAD_SAMPLE_MODES
from fedlora.privacy.noise import NoiseSource, SecureNoise

#: attributes Opacus (or we) put on parameters / modules during DP training; all are removed on close
PARAM_ATTRS = ("grad_sample", "_forward_counter", "_current_grad_sample", "_norm_sample", "summed_grad")
MODULE_ATTRS = ("activations", "max_batch_len", "ft_compute_sample_grad", "autograd_grad_sample_hooks")


@dataclass(frozen=True)
class DPPlan:
    """What one client's DP-SGD round needs: σ and q (from its privacy ledger, already charged for the round), the
    clip norm C, the per-sample gradient engine, and the noise source."""

    noise_multiplier: float
    sample_rate: float
    clip: float
    grad_sample_mode: str
    noise: NoiseSource


def poisson_batches(n: int, *, sample_rate: float, steps: int, source: NoiseSource) -> Iterator[list[int]]:
    """``steps`` batches of record indices; each record is in each batch independently with prob. ``sample_rate``
    (the sampling of Opacus' ``UniformWithReplacementSampler``, drawn from ``source``). Batches can be empty."""
    for _ in range(steps):
        yield torch.nonzero(source.uniform(n) < sample_rate, as_tuple=False).reshape(-1).tolist()


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(k, p) for k, p in model.named_parameters() if p.requires_grad]


class LinearGradSampler:
    """``lora_fast``: per-sample gradients of trainable ``nn.Linear`` modules from a forward hook (input saved)
    and a tensor hook on the output (its gradient), i.e. G_i = Σ_t δ_{i,t} x_{i,t}ᵀ — for ``lora_B`` x is the
    rank-r ``A x``, so G_i is a tiny d_out×r matrix. Writes ``p.grad_sample`` exactly as Opacus hooks do, so the
    same ``DPOptimizer`` clips and noises it. Refuses any other trainable module type."""

    def __init__(self, model: nn.Module, *, loss_reduction: str = "mean") -> None:
        self.model = model
        self.loss_reduction = loss_reduction
        self.handles: list[Any] = []
        self.enabled = True
        modules = []
        for name, m in model.named_modules():
            if not any(p.requires_grad for p in m.parameters(recurse=False)):
                continue
            if type(m) is not nn.Linear:
                raise ValueError(
                    f"privacy.grad_sample_mode=lora_fast handles trainable nn.Linear modules only (LoRA factors, "
                    f"the head); {name} is {type(m).__name__}: use privacy.grad_sample_mode=hooks"
                )
            modules.append(m)
        self.modules = modules
        for m in modules:
            for p in m.parameters(recurse=False):
                if p.requires_grad:
                    p.grad_sample = None
            self.handles.append(m.register_forward_hook(self._forward_hook))

    def _forward_hook(self, module: nn.Linear, inputs, output) -> None:
        if not (self.enabled and module.training and torch.is_grad_enabled() and output.requires_grad):
            return
        x = inputs[0].detach()
        output.register_hook(lambda g, module=module, x=x: self._backward(module, x, g))

    def _backward(self, module: nn.Linear, x: torch.Tensor, g: torch.Tensor) -> None:
        n = x.shape[0]
        g = g.detach()
        if self.loss_reduction == "mean":
            g = g * n  # the loss was averaged over the batch: per-sample gradients are of the per-sample loss
        g3 = g.reshape(n, -1, g.shape[-1])
        w, b = module.weight, module.bias
        if w.requires_grad:
            x3 = x.to(g.dtype).reshape(n, -1, x.shape[-1])
            _accumulate(w, torch.bmm(g3.transpose(1, 2), x3))
        if b is not None and b.requires_grad:
            _accumulate(b, g3.sum(1))
        return None

    def cleanup(self) -> None:
        self.enabled = False
        while self.handles:
            self.handles.pop().remove()


def _with_noise_source(opt_cls: type) -> type:
    """``opt_cls`` (an Opacus DP optimizer) whose ``add_noise`` draws from a fedlora noise source instead of a
    torch generator: the same clipped sum + N(0, (σ·C)²) per coordinate, Opacus' bookkeeping unchanged."""
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    class WithNoiseSource(opt_cls):
        def __init__(self, *args: Any, noise_source: NoiseSource, **kw: Any) -> None:
            super().__init__(*args, **kw)
            self.noise_source = noise_source

        def add_noise(self) -> None:
            sigma = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)
            for p in self.params:
                _check_processed_flag(p.summed_grad)
                g = p.summed_grad
                noise = self.noise_source.normal(g.shape, sigma * self.max_grad_norm, dtype=g.dtype, device=g.device)
                p.grad = (g + noise).view_as(p)
                _mark_as_processed(p.summed_grad)

    WithNoiseSource.__name__ = f"{opt_cls.__name__}WithNoiseSource"
    return WithNoiseSource


def _accumulate(p: nn.Parameter, gs: torch.Tensor) -> None:
    prev = getattr(p, "grad_sample", None)
    p.grad_sample = gs if prev is None else prev + gs


class PrivateTrainer:
    """DP-SGD steps on ``model`` with ``optimizer`` (built over the model's trainable parameters).

    ``expected_batch_size`` is q·n (the Poisson batch's mean size), the denominator of every step.
    ``noise`` is the source of the Gaussian noise (``fedlora.privacy.noise``; default: the OS CSPRNG). Use as a
    context manager, or call ``close()``."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        noise_multiplier: float,
        clip: float,
        expected_batch_size: float,
        grad_sample_mode: str = "hooks",
        noise: NoiseSource | None = None,
    ) -> None:
        from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

        if grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(
                f"privacy.grad_sample_mode={grad_sample_mode!r}: allowed values are {list(GRAD_SAMPLE_MODES)}"
            )
        if noise_multiplier < 0 or clip <= 0 or expected_batch_size <= 0:
            raise ValueError(
                f"noise_multiplier={noise_multiplier}, clip={clip}, expected_batch_size={expected_batch_size}: "
                "need σ >= 0, clip > 0, expected batch > 0"
            )
        params = [p for _, p in trainable(model)]
        if not params:
            raise ValueError("DP-SGD: the model has no trainable parameter (call set_trainable first)")
        opt_params = [p for g in optimizer.param_groups for p in g["params"]]
        if {id(p) for p in opt_params} != {id(p) for p in params}:
            raise ValueError("DP-SGD: the optimizer's parameters must be exactly the model's trainable parameters")
        # Opacus hooks (and ours) only capture activations of modules in training mode. Always call train():
        # a model fresh from from_pretrained + get_peft_model reports training=True at the top while its
        # submodules are in eval mode, so a `model.training` check would leave the head's hook silent.
        model.train()
        self.model = model
        self.params = params
        self.mode = grad_sample_mode
        self.noise_multiplier = float(noise_multiplier)
        self.clip = float(clip)
        self.expected_batch_size = expected_batch_size
        self.noise = noise if noise is not None else SecureNoise()
        self._closed = False
        self.steps = 0
        self.empty_steps = 0
        self.hooks: Any = None
        try:
            if grad_sample_mode == "hooks":
                from opacus.grad_sample import GradSampleHooks

                self.hooks = GradSampleHooks(model, batch_first=True, loss_reduction="mean", strict=True)
                opt_cls = DPOptimizer
            elif grad_sample_mode == "ghost":
                from opacus.grad_sample import GradSampleHooksFastGradientClipping
                from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

                self.hooks = GradSampleHooksFastGradientClipping(
                    model, batch_first=True, loss_reduction="mean", strict=True, max_grad_norm=self.clip
                )
                opt_cls = DPOptimizerFastGradientClipping
            else:
                self.hooks = LinearGradSampler(model, loss_reduction="mean")
                opt_cls = DPOptimizer
            self.optimizer = _with_noise_source(opt_cls)(
                optimizer,
                noise_multiplier=self.noise_multiplier,
                max_grad_norm=self.clip,
                expected_batch_size=expected_batch_size,
                loss_reduction="mean",
                noise_source=self.noise,
            )
            if grad_sample_mode == "ghost":
                self.criterion = DPLossFastGradientClipping(
                    self.hooks, self.optimizer, nn.CrossEntropyLoss(reduction="mean"), loss_reduction="mean"
                )
            if hasattr(self.hooks, "forbid_grad_accumulation"):
                self.hooks.forbid_grad_accumulation()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> PrivateTrainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def step(self, batch: dict[str, torch.Tensor]) -> float | None:
        """One DP-SGD step on a collated batch {input_ids, attention_mask, labels}; the batch's mean loss, or
        None for an empty batch (which still takes a noise-only step)."""
        if self._closed:
            raise RuntimeError("PrivateTrainer is closed")
        labels = batch["labels"]
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        if labels.shape[0] == 0:
            self.empty_steps += 1
            for p in self.params:
                if self.mode == "ghost":
                    p.grad = torch.zeros_like(p)
                else:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            self.optimizer.step()
            return None
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = self.model(**inputs).logits
        if self.mode == "ghost":
            loss = self.criterion(logits, labels)
            value = float(loss.detach())
        else:
            loss = nn.functional.cross_entropy(logits, labels)
            value = float(loss.detach())
        with warnings.catch_warnings():
            # layer 0's LoRA input does not require grad: PyTorch notes the full backward hook fires on outputs
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss.backward()
        self.optimizer.step()
        return value

    def close(self) -> None:
        """Detach everything DP training put on the model; the model is a plain PEFT model again."""
        if self._closed:
            return
        self._closed = True
        if self.hooks is not None:
            self.hooks.cleanup()  # removes the hooks (and, for Opacus, most of its parameter attributes)
        clean_model(self.model)  # Opacus leaves DPOptimizer's ``summed_grad`` and the noised ``.grad`` behind

    @property
    def closed(self) -> bool:
        return self._closed


def clean_model(model: nn.Module) -> None:
    """Remove every DP-training attribute from ``model``'s parameters and modules, and drop gradients."""
    for p in model.parameters():
        for a in PARAM_ATTRS:
            if hasattr(p, a):
                delattr(p, a)
        p.grad = None
    for m in model.modules():
        for a in MODULE_ATTRS:
            if a in m.__dict__:
                delattr(m, a)


def leftover_dp_state(model: nn.Module) -> list[str]:
    """Names of anything DP training could leave behind (for checks): parameter/module attributes, hooks."""
    found = []
    for name, p in model.named_parameters():
        found += [f"{name}.{a}" for a in PARAM_ATTRS if hasattr(p, a)]
    for name, m in model.named_modules():
        found += [f"{name or '<model>'}.{a}" for a in MODULE_ATTRS if a in m.__dict__]
        if m._forward_hooks or m._backward_hooks or m._forward_pre_hooks or m._backward_pre_hooks:
            found.append(f"{name or '<model>'}: hooks")
    return found
