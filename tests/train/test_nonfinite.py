"""The NaN / Inf guard: stop names the step and the module; skip skips and counts."""

from __future__ import annotations

import json

import torch

from tests.train.test_checkpoint import RUN


def test_nonfinite_loss_stops_naming_step_and_module(run_cli, tmp_path) -> None:
    # lr 1e30: step 1 blows the adapters up, step 2's forward overflows in the first adapted layer
    run_dir = tmp_path / "run"
    try:
        run_cli("train", "adapter=lora", *RUN, "recipe.lr=1e30", "recipe.max_grad_norm=0", f"hydra.run.dir={run_dir}")
        raise AssertionError("the run did not stop")
    except SystemExit as exc:
        assert exc.code == 1
    failure = json.loads((run_dir / "failure.json").read_text())
    assert "NonFiniteError: step 2:" in failure["error"], failure["error"]
    assert "the output of model.layers.0." in failure["error"], failure["error"]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*")) == []  # nothing written for a bad step
    assert not (run_dir / "results.json").exists()


def test_skip_skips_the_step_and_counts_it(run_cli, tmp_path, monkeypatch) -> None:
    from moe_lora.routing.recorder import RoutingRecorder

    original, calls = RoutingRecorder.pop_aux_loss, [0]

    def pop(self):  # the 3rd micro-batch's auxiliary loss is NaN
        calls[0] += 1
        loss = original(self)
        return loss * float("nan") if calls[0] == 3 and loss is not None else loss

    monkeypatch.setattr(RoutingRecorder, "pop_aux_loss", pop)
    run_dir = tmp_path / "run"
    code, _, err = run_cli("train", "adapter=loramoe", *RUN, "recipe.on_nonfinite=skip", f"hydra.run.dir={run_dir}")
    assert code == 0, err
    results = json.loads((run_dir / "results.json").read_text())
    assert results["nonfinite_skips"] == 1
    losses = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in losses)
