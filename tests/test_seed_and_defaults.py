"""One rule per setting whatever the front end (issue 21): the request's seed reaches recovery unless the
caller's RecoveryConfig sets its own, and "recover further" goes on with the run's own recipe."""

from __future__ import annotations

import pytest
from torch import nn

from cka_analysis.errors import ConfigError
from cka_analysis.recovery import RecoveryConfig
from cka_analysis.workflow import PruneRequest, further_recovery, recover_further, run_prune

BLOCKS = ("layer1.0", "layer2.1")


def _request(demo: nn.Module, **kw) -> PruneRequest:
    return PruneRequest(model=demo, data="digits", blocks=BLOCKS, latency=False, device="cpu", **kw)


@pytest.mark.parametrize("recovery", ["quick", 1_000, RecoveryConfig(images=1_000),
                                      RecoveryConfig(images=1_000, method="kd")])
def test_the_request_seed_seeds_recovery_given_as_text_or_as_a_config(recovery, demo) -> None:
    assert _request(demo, seed=3, recovery=recovery).recovery.seed == 3
    assert _request(demo, recovery=recovery).recovery.seed == 0


def test_a_seed_set_in_the_config_is_kept(demo) -> None:
    assert _request(demo, seed=3, recovery=RecoveryConfig(images=1_000, seed=1)).recovery.seed == 1
    assert _request(demo, seed=3, recovery=RecoveryConfig(images=1_000, seed=0)).recovery.seed == 0
    with pytest.raises(ConfigError, match="seed"):
        RecoveryConfig(seed=-1)


def test_recovery_runs_with_the_request_seed(demo) -> None:
    """What recover() used is recorded: a config without a seed ran with the request's, and the result
    equals a run whose config names that seed explicitly."""
    cfg = RecoveryConfig(images=400, bn_images=64, batch_size=32)
    implicit = run_prune(_request(demo, seed=2, recovery=cfg)).record
    explicit = run_prune(_request(demo, seed=2, recovery=RecoveryConfig(images=400, bn_images=64, batch_size=32,
                                                                         seed=2))).record
    other = run_prune(_request(demo, seed=2, recovery=RecoveryConfig(images=400, bn_images=64, batch_size=32,
                                                                      seed=0))).record
    assert implicit.recovery["config"]["seed"] == 2 and other.recovery["config"]["seed"] == 0
    assert implicit.final.accuracy == explicit.final.accuracy
    assert implicit.recovery["history"] == explicit.recovery["history"]


def test_recover_further_goes_on_with_the_runs_recipe(demo) -> None:
    run = run_prune(_request(demo, seed=4, recovery=RecoveryConfig(images=300, method="kd", lr=0.02,
                                                                    bn_images=64, batch_size=32)))
    cfg = further_recovery(run.record, "1000")
    assert (cfg.images, cfg.method, cfg.lr, cfg.batch_size, cfg.seed) == (1_000, "kd", 0.02, 32, 4)
    assert further_recovery(run.record.to_dict(), "quick").name == "quick"
    more = recover_further(run.model, run.record, demo, 500)
    assert more.record.recovery["further"][0]["config"]["method"] == "kd"
    assert more.record.recovery["further"][0]["config"]["seed"] == 4
