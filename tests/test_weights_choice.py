"""No silent random weights (issue 13, point 1).

A registry model opened by a front end without weights gets its default named weights and says so; random
initialisation happens only when asked for by name (``--weights random`` / ``weights="random"``); an architecture
without fitting default weights is refused with the choices named.
"""

from __future__ import annotations

import torch

from cka_analysis.cli import main
from cka_analysis.models import RANDOM_WEIGHTS, build_model, default_weights, describe_weight_choices


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_random_is_an_explicit_name_in_the_library():
    demo = build_model("digits_resnet", weights="demo")
    rand = build_model("digits_resnet", weights=RANDOM_WEIGHTS)
    assert rand.cka_preset.weights == "random"
    assert not torch.equal(rand.state_dict()["linear.weight"], demo.state_dict()["linear.weight"])


def test_default_weights_are_the_named_ones_that_fit():
    assert default_weights("digits_resnet") == "demo"
    assert default_weights("cifar_resnet56") == "cifar10"
    assert default_weights("digits_resnet", num_classes=7) is None  # demo has 10 classes
    assert default_weights("vit_tiny") is None
    phrase = describe_weight_choices("cifar_resnet56")
    assert "cifar10" in phrase and "cifar10jpeg" in phrase and "'random'" in phrase


def test_cli_without_weights_uses_the_default_and_says_so(capsys):
    code, out, err = _run(capsys, "evaluate", "digits_resnet", "--data", "digits", "--samples", "100",
                          "--device", "cpu")
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "'demo'" in notes[0] and "random" in notes[0], err
    top1 = float(out.split("top-1 ")[1].split(" %")[0])
    assert top1 > 80, out  # trained weights, not chance (10 %)


def test_cli_random_weights_only_on_request(capsys):
    code, out, err = _run(capsys, "evaluate", "digits_resnet", "--weights", "random", "--data", "digits",
                          "--samples", "100", "--device", "cpu")
    assert code == 0, err
    assert "note:" not in err
    top1 = float(out.split("top-1 ")[1].split(" %")[0])
    assert top1 < 50, out


def test_cli_refuses_a_model_without_default_weights(capsys):
    code, _, err = _run(capsys, "score", "--model", "vit_tiny", "--data", "digits", "--quiet")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert "--weights is required for vit_tiny" in lines[0] and "'random'" in lines[0]


def test_cli_refuses_when_the_default_weights_do_not_fit_the_classes(capsys):
    code, _, err = _run(capsys, "score", "--model", "digits_resnet", "--num-classes", "7", "--data", "digits",
                        "--quiet")
    assert code == 2
    assert "10 classes" in err and "--num-classes 7" in err and "'random'" in err
