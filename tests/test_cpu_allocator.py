"""The CPU trainer keeps freed activation memory in the process (:func:`cka_analysis.device.tune_cpu_allocator`):
counted in page faults per training step, in fresh processes, since the setting cannot be undone in this one."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from cka_analysis.device import CPU_ALLOCATOR_ENV

#: A fresh process builds a Trainer on the CPU (which tunes the allocator unless the setting says ``default``),
#: runs training steps of a CIFAR ResNet-20 at batch 64 and prints the minor page faults per step.
SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset
    from cka_analysis.device import tune_cpu_allocator
    from cka_analysis.models import build_model
    from cka_analysis.training import Trainer, TrainSpec
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model("cifar_resnet20", weights=None)
    data = TensorDataset(torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,)))
    objective = lambda net, x, y: F.cross_entropy(net(x), y)
    trainer = Trainer(model, DataLoader(data, batch_size=64), objective, TrainSpec(total_steps=1, amp="none"),
                      device="cpu")
    x, y = data.tensors
    def step():
        trainer.opt.zero_grad()
        objective(model, x, y).backward()
        trainer.opt.step()
    for _ in range(2):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        step()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    print(json.dumps({"tuned": tune_cpu_allocator(), "faults_per_step": (after - before) / 4}))
""")


def _faults(setting: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != CPU_ALLOCATOR_ENV}
    if setting is not None:
        env[CPU_ALLOCATOR_ENV] = setting
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's allocator: glibc (Linux) only")
def test_the_cpu_trainer_stops_the_page_faults_of_every_step() -> None:
    glibc = _faults("default")
    tuned = _faults(None)
    assert not glibc["tuned"] and tuned["tuned"]
    # glibc's defaults fault a step's activations in again (thousands of pages per step); tuned, few or none
    assert glibc["faults_per_step"] > 2_000
    assert tuned["faults_per_step"] < glibc["faults_per_step"] / 5
