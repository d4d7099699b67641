"""AGC stage (docs/methods/agc.md): ``train_ann_sparse``, the compressed ANN trained at a fixed density with attention transfer.

The student starts from scratch (the recipe's model, ``init: scratch``) or from the
meta-model's weights (``init: meta``), gets masks at ``density`` (weight level,
``structure: irregular``, or whole channels, ``structure: channel``) and trains as an
ANN with ``CE + attention_loss`` against the frozen meta-model (the run's trained ANN,
or ``meta_checkpoint``) while :class:`~snncompress.compress.sparse_momentum.SparseMomentum`
prunes, redistributes and regrows at the end of every epoch, density held.

``method: one_shot_magnitude`` is the plain baseline beside it: the meta-model's weights
are pruned once to ``density`` by magnitude (``mask_init``, by default ``global_magnitude``:
one ranking of ``|w|`` over all the masked tensors) and fine-tuned with CE alone, the mask
fixed (no prune / regrow events, no attention term; ``beta`` must be 0).

The SNN steps of AGC are the DIET stages as they are: ``convert`` copies the masked
ANN into the SNN and calibrates thresholds, ``train_snn`` trains weights, thresholds
and leaks by BPTT; masks live on the model and the loop's ``EnforceMasks`` always
runs, so masked weights stay exactly zero (their gradient is zero through the mask
parametrization). With ``structure: channel`` the stage ends, by default, with the
physically narrower model (:func:`~snncompress.compress.structure.narrow_model`),
so the SNN is smaller and faster, not only masked.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Literal

from pydantic import Field

from ..checkpoint import load_checkpoint
from ..compress.attention import AttentionTransfer, block_ends
from ..compress.masks import density as mask_density
from ..compress.masks import remove_masks
from ..compress.pruning import live_count, prunable_weights
from ..compress.sparse_momentum import (SparseMomentum, init_channel_masks, init_weight_masks, live_channels)
from ..compress.structure import channel_groups, narrow_model, projection_conflicts
from ..errors import UserError
from ..io import write_json
from .base import Chain, StageContext, StageResult, TrainOptions, fit, register_stage, training_metrics


class TrainANNSparseOptions(TrainOptions):
    produces = "ann"

    kind: Literal["train_ann_sparse"] = "train_ann_sparse"
    density: float = Field(0.1, gt=0, le=1, description="kept fraction: of the masked weights (irregular) or of "
                                                         "the channels (channel), held through training")
    structure: Literal["irregular", "channel"] = Field("irregular", description="weight-level or channel-level")
    beta: float = Field(1000.0, ge=0, description="attention-transfer weight (0: sparse learning alone)")
    attention_reduction: Literal["mean", "norm"] = Field(
        "mean", description="mean: squared differences averaged over map elements and batch (Zagoruyko's code, "
                            "what beta = 1000 was set for); norm: the AGC paper's per-image L2 norm, batch mean")
    blocks: list[int] | None = Field(None, description="indices of the block ends compared (default: all)")
    meta_checkpoint: str | None = Field(None, description="the dense meta-model (an ANN model.safetensors); "
                                                          "default: the run's train_ann model")
    method: Literal["sparse_momentum", "one_shot_magnitude"] = Field(
        "sparse_momentum", description="sparse_momentum: prune / redistribute / regrow every epoch (docs/methods/agc.md); "
                                       "one_shot_magnitude: prune the meta-model once, fine-tune with the mask "
                                       "fixed (needs init meta, beta 0, structure irregular)")
    init: Literal["scratch", "meta"] = Field("scratch", description="student weights: fresh, or the meta-model's")
    mask_init: Literal["random", "magnitude", "global_magnitude"] | None = Field(
        None, description="initial mask: random, or the largest weights / channel norms per layer, or the largest "
                          "weights ranked over all masked layers together (irregular only); default: random from "
                          "scratch, magnitude from the meta-model (global_magnitude for one_shot_magnitude)")
    prune_rate: float = Field(0.5, ge=0, lt=1, description="initial prune fraction, cosine-decayed over the epochs")
    sparse_momentum: float = Field(0.9, ge=0, lt=1, description="momentum of the gradient that redistributes "
                                                                "and regrows")
    exclude: list[str] = Field(default_factory=list, description="conv/linear weights left dense (irregular)")
    min_channels: int = Field(1, ge=1, description="channels every group keeps (channel)")
    narrow: bool = Field(True, description="channel: end as the physically narrower model")

    def check(self, chain: Chain) -> None:
        super().check(chain)
        needs_meta = self.beta > 0 or self.init == "meta"
        if needs_meta and self.meta_checkpoint is None and not any(mode == "ann" for _, mode in chain.earlier):
            raise ValueError("meta_checkpoint: no meta-model; put train_ann before this stage or name a checkpoint")
        if self.structure == "channel" and self.exclude:
            raise ValueError("exclude: only for structure irregular")
        if self.structure == "channel" and self.mask_init == "global_magnitude":
            raise ValueError("mask_init: global_magnitude is only for structure irregular")
        if self.method == "one_shot_magnitude" and (self.init != "meta" or self.beta > 0
                                                    or self.structure != "irregular"):
            raise ValueError("method: one_shot_magnitude prunes the meta-model once and fine-tunes with CE alone; "
                             "it needs init: meta, beta: 0 and structure: irregular")

    def input_digest(self) -> str:
        if self.meta_checkpoint is None:
            return ""
        digest = hashlib.sha256()
        with open(self.meta_checkpoint, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()[:16]


def meta_model(ctx: StageContext, opts: TrainANNSparseOptions):
    """A private ANN-mode copy of the meta-model: ``meta_checkpoint`` or the run's trained ANN."""
    if opts.meta_checkpoint is not None:
        return load_checkpoint(opts.meta_checkpoint, ctx.device).model.set_spiking(False)
    if ctx.reference_ann is None:
        raise UserError("train_ann_sparse: no meta-model (no finished train_ann stage in this run; "
                        "set meta_checkpoint)")
    return copy.deepcopy(ctx.reference_ann).set_spiking(False)


@register_stage("train_ann_sparse", TrainANNSparseOptions)
def train_ann_sparse(ctx: StageContext, opts: TrainANNSparseOptions) -> StageResult:
    """AGC steps 2-3: the compressed ANN at fixed density, guided by the meta-model's attention maps."""
    meta = meta_model(ctx, opts) if (opts.beta > 0 or opts.init == "meta") else None
    student = copy.deepcopy(meta) if opts.init == "meta" else ctx.new_model().set_spiking(False)
    student.to(ctx.device)
    one_shot = opts.method == "one_shot_magnitude"
    how = opts.mask_init or ("global_magnitude" if one_shot else "magnitude" if opts.init == "meta" else "random")
    params_before = sum(p.numel() for p in student.parameters())
    if opts.structure == "irregular":
        try:
            names = prunable_weights(student, opts.exclude)
        except ValueError as exc:
            raise UserError(f"train_ann_sparse: {exc}") from None
        init_weight_masks(student, names, opts.density, how, seed=ctx.seed)
        # one-shot: no events (prune rate 0), the callback then only reads the momentum
        sparse = SparseMomentum("irregular", names=names, prune_rate=0.0 if one_shot else opts.prune_rate,
                                momentum=opts.sparse_momentum)
    else:
        try:
            groups = channel_groups(student)
        except ValueError as exc:
            raise UserError(f"train_ann_sparse: structure: {exc}") from None
        init_channel_masks(student, groups, opts.density, how, seed=ctx.seed, min_channels=opts.min_channels)
        sparse = SparseMomentum("channel", groups=groups, prune_rate=opts.prune_rate, momentum=opts.sparse_momentum,
                                min_channels=opts.min_channels)
    callbacks = [sparse]
    attention = None
    if opts.beta > 0:
        try:
            attention = AttentionTransfer(meta, opts.beta, opts.blocks, opts.attention_reduction)
        except ValueError as exc:
            raise UserError(f"train_ann_sparse: {exc}") from None
        callbacks.append(attention)
    try:
        history = fit(ctx, student, opts.train_config(ctx.seed), desc="ann_sparse", callbacks=callbacks)
    finally:
        sparse.close()
        if attention is not None:
            attention.close()
    metrics = training_metrics(history)
    metrics.update({"method": opts.method, "mask_init": how, "structure": opts.structure,
                    "target_density": opts.density, "beta": opts.beta, "events": len(sparse.events),
                    "regrown": sum(sum(e["share"].values()) for e in sparse.events)})
    write_json(ctx.stage_dir / "events.json", {"events": sparse.events})
    if opts.beta > 0:
        metrics["attention_blocks"] = [name for name, _ in block_ends(student)] if opts.blocks is None else \
            [block_ends(student)[b][0] for b in opts.blocks]
    if opts.structure == "irregular":
        metrics.update({"density": mask_density(student), "live_weights": live_count(student, sparse.names)})
    else:
        keep = live_channels(student, sparse.groups)
        metrics["channels"] = {g.name: f"{int(keep[g.name].numel())}/{g.size}" for g in sparse.groups}
        metrics["channel_density"] = (sum(int(k.numel()) for k in keep.values())
                                      / sum(g.size for g in sparse.groups))
        clashes = [(a, b) for a, b in projection_conflicts(student, sparse.groups)
                   if keep[a].numel() == keep[b].numel()]
        if opts.narrow and clashes:
            print(f"[train_ann_sparse] not narrowed: stride-1 projection blocks would get equal in and out "
                  f"widths ({clashes}); the model stays masked", flush=True)
        metrics["narrowed"] = bool(opts.narrow and not clashes)
        if metrics["narrowed"]:
            student = narrow_model(student, keep, sparse.groups)
            remove_masks(student)  # all True after surgery: the narrow model is dense
    metrics["params_before"] = params_before
    metrics["params_after"] = sum(p.numel() for p in student.parameters())
    print(f"[train_ann_sparse] {opts.structure}: validation accuracy {metrics['val_accuracy']:.4f}, "
          f"params {params_before} -> {metrics['params_after']}", flush=True)
    return StageResult(student.set_spiking(False), metrics)
