"""CPU training treats subnormal floats as zero while it runs, and only while it runs."""

from __future__ import annotations

import torch

from snncompress.training import Callback, TrainConfig, train

from test_resume import tiny_loader, tiny_model

SUBNORMAL = 1e-39  # below float32's smallest normal value, 1.18e-38


def _product_of_a_subnormal() -> float:
    return float(torch.tensor([SUBNORMAL]) * torch.tensor([1.0]))


class RecordSubnormalArithmetic(Callback):
    """After every step: what ``1e-39 * 1`` computes to."""

    def __init__(self):
        self.products = []

    def after_step(self, state) -> None:
        self.products.append(_product_of_a_subnormal())


def test_training_on_cpu_flushes_subnormals_and_restores_the_default_afterwards():
    assert _product_of_a_subnormal() > 0  # PyTorch's default: subnormals are computed
    record = RecordSubnormalArithmetic()
    train(tiny_model(), tiny_loader(), tiny_loader(seed=4), TrainConfig(epochs=1, lr=1e-2), callbacks=[record])
    assert len(record.products) == 6 and set(record.products) == {0.0}
    assert _product_of_a_subnormal() > 0
