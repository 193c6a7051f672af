"""Re-create the bundled demo checkpoint: ``python scripts/train_digits.py``.

Trains ``digits_resnet`` from scratch on scikit-learn's 8×8 digits (train split, seeded) with the library's own
fine-tuning loop, then writes ``assets/digits_resnet.safetensors`` and ``assets/digits_resnet.json`` (recipe and
test accuracy). Deterministic on CPU for a given torch version; takes about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from cka_analysis.config import ASSETS_DIR
from cka_analysis.data import load_dataset, make_loader
from cka_analysis.metrics import count_macs, count_params, evaluate
from cka_analysis.models import build_model
from cka_analysis.training import FinetuneConfig, finetune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ASSETS_DIR)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    model = build_model("digits_resnet")
    preset = model.cka_preset
    train = make_loader(load_dataset("digits", "train", preset, augment=True), batch_size=64, shuffle=True,
                        seed=args.seed, num_workers=0)
    test = make_loader(load_dataset("digits", "test", preset), batch_size=256, num_workers=0)
    config = FinetuneConfig(epochs=args.epochs, lr=0.1, weight_decay=5e-4, schedule="onecycle",
                            label_smoothing=0.05, seed=args.seed, eval_every=10**9)

    def report(done: int, total: int | None, message: str) -> None:
        if done % 100 == 0 or done == total:
            print(message, flush=True)

    finetune(model, train, config, device="cpu", progress=report)
    acc = evaluate(model, test, device="cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(args.out / "digits_resnet.safetensors"), metadata={"arch": "digits_resnet"})
    meta = {
        "arch": "digits_resnet",
        "data": "scikit-learn load_digits, stratified 80/20 split (seed 0): 1437 train / 360 test",
        "recipe": {**config.to_dict(), "batch_size": 64, "augmentation": "random crop (padding 1), no flip"},
        "test_top1": round(acc.top1, 2),
        "test_loss": round(acc.loss, 4),
        "macs": count_macs(model, preset.input_size),
        "params": count_params(model),
        "torch": torch.__version__,
        "script": "scripts/train_digits.py",
    }
    (args.out / "digits_resnet.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"test accuracy {acc}", flush=True)


if __name__ == "__main__":
    main()
