"""Attention transfer (AGC, docs/methods/agc.md step 2): spatial attention maps at block ends and the attention loss.

The spatial attention map of an activation ``A`` ``[B, C, H, W]`` is
``Q = vec(sum_c |A_c|^2)`` ``[B, H*W]`` (Zagoruyko & Komodakis 2017). With the
student S (the compressed ANN being trained) and the frozen dense meta-model M,
the loss added to cross-entropy is, with ``q = Q / ||Q||_2`` per image,

* ``reduction="norm"`` (docs/methods/agc.md as written)::

      L_at = (beta / 2) * sum_j mean_b || q_S^j - q_M^j ||_2

* ``reduction="mean"`` (the default; Zagoruyko & Komodakis' code, for which beta = 1000
  was chosen: "divided by the number of elements in the attention map and batch size")::

      L_at = (beta / 2) * sum_j mean_{b, i} (q_S^j - q_M^j)_i^2

With beta = 1000 the literal form is hundreds of times the cross-entropy (a map
of 14 x 14 positions gives terms near 1 per block end), the mean form about 1.

Block ends ("taps") are activations read with forward pre-hooks on the module
that consumes them, so they work in ANN mode (the ReLU is not a module):

* VGG / convnet: the input of every ``AvgPool2d`` in ``features`` (the end of
  each pooling stage) and, when ``features`` does not end with a pool, the
  input of ``classifier.0`` (flattened ``[B, C*H*W]``, reshaped back to ``C``);
* ResNet: the output of every block (the input of the next block's ``conv1``,
  and of ``pool`` after the last block).

Student and meta-model may differ in width (structured pruning): maps sum over
channels, so only spatial sizes must agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..hooks import Callback, TrainState


def attention_map(activation: torch.Tensor) -> torch.Tensor:
    """``vec(sum_c |A_c|^2)``: ``[B, C, H, W]`` (or ``[B, C, N]``) -> ``[B, H*W]``."""
    return activation.pow(2).sum(1).flatten(1)


REDUCTIONS = ("mean", "norm")


def attention_loss(student: list[torch.Tensor], meta: list[torch.Tensor], beta: float = 1000.0,
                   reduction: str = "mean") -> torch.Tensor:
    """The attention loss over the block-end activations of both models (``reduction``: module docstring)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if len(student) != len(meta):
        raise ValueError(f"{len(student)} student block ends but {len(meta)} of the meta-model")
    total = None
    for a_s, a_m in zip(student, meta):
        q_s, q_m = F.normalize(attention_map(a_s), dim=1), F.normalize(attention_map(a_m), dim=1)
        if q_s.shape != q_m.shape:
            raise ValueError(f"attention maps differ in size: {tuple(q_s.shape)} vs {tuple(q_m.shape)}")
        diff = q_s - q_m
        term = diff.norm(dim=1).mean() if reduction == "norm" else diff.pow(2).mean()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("no block ends to compare")
    return 0.5 * beta * total


def block_ends(model: nn.Module) -> list[tuple[str, int | None]]:
    """``[(module name, channels or None)]``: modules whose input is a block-end activation (module docstring).

    The model's family says which (:meth:`snncompress.models.SpikingNetwork.block_ends`); ``channels`` is
    set where the input arrives flattened (``classifier.0``): ``[B, C*H*W]`` -> ``[B, C, H*W]``.
    """
    return model.block_ends()


class ActivationTap:
    """Forward pre-hooks keeping the latest input of each block-end module (in order); :meth:`close` removes them."""

    def __init__(self, model: nn.Module, blocks: list[int] | None = None):
        ends = block_ends(model)
        if blocks is not None:
            bad = [b for b in blocks if not 0 <= b < len(ends)]
            if bad:
                raise ValueError(f"blocks: {bad} out of range; the model has {len(ends)} block ends "
                                 f"({[name for name, _ in ends]})")
            ends = [ends[b] for b in blocks]
        self.ends = ends
        self.values: list[torch.Tensor | None] = [None] * len(ends)
        self.handles = [model.get_submodule(name).register_forward_pre_hook(self._hook(i, channels))
                        for i, (name, channels) in enumerate(ends)]

    def _hook(self, i: int, channels: int | None):
        def hook(module, inputs):
            x = inputs[0]
            if channels is not None:
                x = x.reshape(x.shape[0], channels, -1)
            self.values[i] = x
        return hook

    def take(self) -> list[torch.Tensor]:
        values, self.values = self.values, [None] * len(self.ends)
        if any(v is None for v in values):
            raise RuntimeError("a block end was not reached by the forward pass")
        return values

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class AttentionTransfer(Callback):
    """Adds ``attention_loss`` between the student (the trained model) and a frozen ``meta`` model.

    The student's block ends are captured during the loop's own forward pass;
    the meta-model runs once more on the same images without gradient.
    Stateless across steps (nothing to resume). Call :meth:`close` after training.
    """

    def __init__(self, meta: nn.Module, beta: float = 1000.0, blocks: list[int] | None = None,
                 reduction: str = "mean"):
        if beta < 0 or reduction not in REDUCTIONS:
            raise ValueError(f"need beta >= 0 and reduction in {REDUCTIONS}, got {beta}, {reduction!r}")
        self.meta, self.beta, self.blocks, self.reduction = meta, float(beta), blocks, reduction
        self.student_tap: ActivationTap | None = None
        self.meta_tap = ActivationTap(meta, blocks)
        self.last = 0.0

    def on_train_begin(self, state: TrainState) -> None:
        self.meta.to(state.device).eval().requires_grad_(False)
        if self.student_tap is None:
            self.student_tap = ActivationTap(state.model, self.blocks)

    def loss(self, state, images, labels, logits, loss):
        student = self.student_tap.take()
        with torch.no_grad():
            self.meta(images)
        at = attention_loss([s.float() for s in student], [m.float() for m in self.meta_tap.take()], self.beta,
                            self.reduction)
        self.last = float(at.detach())
        return loss + at

    def on_epoch_end(self, state: TrainState, row: dict) -> None:
        row["attention_loss"] = self.last

    def close(self) -> None:
        for tap in (self.student_tap, self.meta_tap):
            if tap is not None:
                tap.close()
        self.student_tap = None
