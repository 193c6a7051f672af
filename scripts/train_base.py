"""Train the two non-ResNet base models of the "your model" benchmark: ``python scripts/train_base.py``.

No pretrained timm or Hugging Face weights can be downloaded on the project's machines, so the base models of
``benchmarks/your_models.py`` are trained here from a fixed seed on the shared CIFAR-10 copy
(``imagefolder:../shared/data/cifar10-jpeg``, 50,000 train / 10,000 test images), with the library's own
fine-tuning loop (SGD, one-cycle schedule, label smoothing, random crop + flip), one after the other:

* ``convnext``: timm ``convnext_atto`` (random init) with a stride-2 stem (``patch_size=2``) for 32×32 inputs,
  10 classes. Written as ``OUT/convnext_atto_cifar10.safetensors``; its metadata carries the timm name, the
  ``create_model`` keyword arguments and the preset, so ``--model timm:convnext_atto --weights FILE`` rebuilds it.
* ``vit``: a Hugging Face ``ViTForImageClassification`` (patch 4 at 32×32, width 96, 6 layers, 3 heads),
  written as a Hugging Face directory ``OUT/vit_cifar10_hf/`` (``config.json``, ``model.safetensors``,
  ``preprocessor_config.json``) that ``--model hf:OUT/vit_cifar10_hf`` opens.

The run is resumable: the whole training state is checkpointed every epoch under ``OUT/ckpt/``; running the
same command again continues where a killed run stopped. Progress goes to ``OUT/<model>.log.jsonl`` and the
result (recipe, test accuracy on all 10,000 images, MACs, timings) to ``OUT/<model>.json``. CPU runs are
deterministic for a given torch version (one thread, ``amp="none"``, no data workers).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from cka_analysis.data import load_dataset, make_loader
from cka_analysis.metrics import count_macs, count_params, evaluate
from cka_analysis.models.external import HFImageClassifier
from cka_analysis.models.preset import IMAGENET_MEAN, IMAGENET_STD, Preset
from cka_analysis.training import FinetuneConfig, finetune

DATA = "imagefolder:../shared/data/cifar10-jpeg"
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

#: the recipes (epochs sized for about 20-30 minutes each on one CPU core of a shared machine)
RECIPES = {
    "convnext": {"epochs": 4, "lr": 0.05, "weight_decay": 5e-4, "batch_size": 64, "label_smoothing": 0.1},
    "vit": {"epochs": 2, "lr": 0.05, "weight_decay": 1e-4, "batch_size": 64, "label_smoothing": 0.1},
}
TIMM_KWARGS = {"patch_size": 2, "num_classes": 10}
VIT_CONFIG = {"image_size": 32, "patch_size": 4, "hidden_size": 96, "num_hidden_layers": 6,
              "num_attention_heads": 3, "intermediate_size": 192, "num_labels": 10}


def build(which: str, classes: list[str]) -> tuple[nn.Module, Preset]:
    """The randomly initialised model and its data preset."""
    if which == "convnext":
        import timm

        model = timm.create_model("convnext_atto", pretrained=False, **TIMM_KWARGS)
        preset = Preset(arch="timm:convnext_atto", input_size=(3, 32, 32), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                        num_classes=10)
        return model, preset
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(**VIT_CONFIG, id2label=dict(enumerate(classes)),
                       label2id={c: i for i, c in enumerate(classes)})
    preset = Preset(arch="hf:vit", input_size=(3, 32, 32), mean=CIFAR_MEAN, std=CIFAR_STD, num_classes=10)
    return HFImageClassifier(ViTForImageClassification(config)), preset


def save(which: str, model: nn.Module, preset: Preset, out: Path) -> Path:
    """Write the trained model in its native format (see the module docstring)."""
    if which == "convnext":
        path = out / "convnext_atto_cifar10.safetensors"
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(path), metadata={"timm_model": "convnext_atto",
                                              "timm_kwargs": json.dumps(TIMM_KWARGS),
                                              "preset": json.dumps(preset.to_dict())})
        return path
    from transformers import ViTImageProcessor

    path = out / "vit_cifar10_hf"
    model.hf.save_pretrained(path)
    ViTImageProcessor(do_resize=True, size={"height": 32, "width": 32}, image_mean=list(preset.mean),
                      image_std=list(preset.std)).save_pretrained(path)
    return path


def train(which: str, out: Path, seed: int) -> dict:
    recipe = RECIPES[which]
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    t0 = time.time()
    probe = Preset(arch="probe", input_size=(3, 32, 32), mean=CIFAR_MEAN, std=CIFAR_STD, num_classes=10)
    classes = load_dataset(DATA, "test", probe).classes
    model, preset = build(which, classes)
    train_set = load_dataset(DATA, "train", preset, augment=True, in_memory=True)
    test_set = load_dataset(DATA, "test", preset, in_memory=True)
    loader = make_loader(train_set, batch_size=recipe["batch_size"], shuffle=True, seed=seed, num_workers=0,
                         drop_last=True)
    config = FinetuneConfig(epochs=recipe["epochs"], lr=recipe["lr"], weight_decay=recipe["weight_decay"],
                            schedule="onecycle", label_smoothing=recipe["label_smoothing"], amp="none",
                            seed=seed, eval_every=10**9)
    log = (out / f"{which}.log.jsonl").open("a")
    t_train = time.time()

    def report(done: int, total: int | None, message: str) -> None:
        if done % 100 == 0 or done == total:
            row = {"step": done, "total": total, "message": message, "seconds": round(time.time() - t_train, 1)}
            log.write(json.dumps(row) + "\n")
            log.flush()

    (out / "ckpt").mkdir(parents=True, exist_ok=True)
    finetune(model, loader, config, device="cpu", progress=report, checkpoint_path=out / "ckpt" / f"{which}.pt",
             checkpoint_every=len(loader), resume=True)
    train_s = time.time() - t_train
    acc = evaluate(model, make_loader(test_set, batch_size=256, num_workers=0), device="cpu")
    path = save(which, model, preset, out)
    meta = {
        "model": which,
        "saved": str(path),
        "data": DATA + " (50,000 train / 10,000 test)",
        "recipe": {**config.to_dict(), **recipe, "augmentation": "random crop (padding 4) + horizontal flip"},
        "architecture": ({"timm": "convnext_atto", **TIMM_KWARGS} if which == "convnext" else
                         {"transformers": "ViTForImageClassification", **VIT_CONFIG}),
        "test_top1": round(acc.top1, 2),
        "test_loss": round(acc.loss, 4),
        "macs": count_macs(model, preset.input_size),
        "params": count_params(model),
        "train_seconds": round(train_s, 1),
        "total_seconds": round(time.time() - t0, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "seed": seed,
        "script": "scripts/train_base.py",
    }
    (out / f"{which}.json").write_text(json.dumps(meta, indent=2) + "\n")
    log.write(json.dumps({"done": True, "test_top1": meta["test_top1"]}) + "\n")
    log.close()
    return meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="convnext,vit", help="comma-separated: convnext, vit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("/work/artifacts/base"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for which in args.models.split(","):
        if (args.out / f"{which}.json").exists():
            print(f"{which}: done already ({args.out / f'{which}.json'})", flush=True)
            continue
        meta = train(which, args.out, args.seed)
        print(f"{which}: test top-1 {meta['test_top1']} % in {meta['train_seconds']} s", flush=True)


if __name__ == "__main__":
    main()
