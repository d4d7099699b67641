"""Shared fixtures: tiny models and recipes that run in seconds on 2 CPU cores."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def data_dir():
    """The offline data folder (env SNNCOMPRESS_DATA, as .ci/run sets it); skips when absent."""
    path = os.environ.get("SNNCOMPRESS_DATA")
    if not path or not os.path.isdir(path):
        pytest.skip("SNNCOMPRESS_DATA not set")
    return path


TINY_RECIPE = """
name: tiny
seed: 0
device: cpu
data: {dataset: mnist-builtin, batch_size: 32, train_subset: 256, test_subset: 64}
model:
  arch: convnet
  timesteps: 2
  options: {features: [4, A], classifier: [8]}
stages:
  - {kind: train_ann, epochs: 1, lr: 1.0e-3, max_batches: 2}
  - {kind: convert, calib_images: 32, calib_timesteps: 4}
  - {kind: train_snn, epochs: 1, lr: 1.0e-4, max_batches: 2, lean_memory: true, checkpoint_layers: true}
measure: {robustness_images: 32, ops_images: 32, latency_repeats: 2, noise_sigmas: [0.0, 0.1]}
"""


@pytest.fixture
def tiny_recipe(tmp_path):
    """Path of a recipe that trains a 4-channel convnet for two batches per stage."""
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_RECIPE)
    return path


#: A recipe's head for CRIT stages: a 2-step convnet with BatchNorm and CRIT's neuron on 320 built-in images.
CRIT_TINY_HEAD = """
name: crit-tiny
seed: 0
device: cpu
data: {dataset: mnist-builtin, batch_size: 32, train_subset: 320, test_subset: 64}
model:
  arch: convnet
  timesteps: 2
  neuron: {reset: hard, leak: 0.25, threshold: 0.3, surrogate: atan, learn_leak: false, learn_threshold: false}
  options: {batchnorm: true, features: [4, A, 8, A], classifier: [16], dropout: 0.0}
"""
