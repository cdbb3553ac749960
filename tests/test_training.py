"""The training scaffold: schedule values, optimiser groups, accumulation, checkpoints, log, early stopping."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from wsitools.errors import ConfigError, ModelError
from wsitools.io import loader_workers, sha256_file, stable_hash
from wsitools.training import BestState, Checkpoints, CsvLog, Schedule, Stepper, adamw, epoch_generator

CPU = torch.device("cpu")


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 2)
        self.norm = nn.LayerNorm(2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.frozen(self.norm(self.lin(x)))


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, generator=g), torch.randn(4, 2, generator=g)) for _ in range(n)]


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def _stepper(model: nn.Module, **kw) -> Stepper:
    schedule = Schedule(0.1, kind="cosine", total_steps=6, warmup_steps=2)
    return Stepper(adamw(model, lr=0.1, weight_decay=0.05, decay="matrices"), schedule=schedule, device=CPU, **kw)


def test_schedule_values():
    cos = Schedule(1e-3, kind="cosine", total_steps=100, warmup_steps=10, min_lr=1e-5)
    assert [cos.at(s) for s in (0, 5, 10)] == pytest.approx([0.0, 5e-4, 1e-3])
    assert cos.at(55) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    assert cos.at(100) == pytest.approx(1e-5) and cos.at(150) == pytest.approx(1e-5)
    assert [Schedule(0.02).at(s) for s in (0, 7, 10**6)] == [0.02, 0.02, 0.02]
    with pytest.raises(ConfigError, match="cosine or constant"):
        Schedule(0.1, kind="linear")  # type: ignore[arg-type]


def test_adamw_groups_skip_frozen_and_spare_biases_and_norms():
    model = _Tiny()
    matrices = adamw(model, lr=0.1, weight_decay=0.05, decay="matrices")
    decayed, spared = matrices.param_groups
    assert decayed["weight_decay"] == 0.05 and [p.shape for p in decayed["params"]] == [(2, 3)]
    assert spared["weight_decay"] == 0.0 and [p.shape for p in spared["params"]] == [(2,), (2,), (2,)]
    (every,) = adamw(model, lr=0.1, weight_decay=0.05).param_groups
    assert len(every["params"]) == 4 and every["weight_decay"] == 0.05  # the frozen layer is left out
    assert every["betas"] == (0.9, 0.999)


def test_accumulation_makes_one_step_from_the_mean_gradient():
    batches = _batches(4)
    accum, single = _Tiny(), _Tiny()
    sa = _stepper(accum, accum_steps=2)
    assert [sa.backward(_loss(accum, b)) for b in batches] == [False, True, False, True]
    assert sa.step == 2 and sa.lr == pytest.approx(0.05)  # the second step's warm-up rate
    assert all(p.grad is None for p in accum.parameters())  # cleared after each step
    ss = _stepper(single)
    for a, b in zip(batches[::2], batches[1::2]):
        ss.backward((_loss(single, a) + _loss(single, b)) / 2)
    assert ss.step == 2
    for p, q in zip(accum.parameters(), single.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)
    # the first step is taken at lr 0 (warm-up starts at zero): only the second one moved anything
    assert not torch.equal(accum.lin.weight, _Tiny().lin.weight)


def test_checkpoint_round_trip_continues_with_the_same_next_steps(tmp_path):
    batches = _batches(5)
    model = _Tiny()
    stepper = _stepper(model)
    ckpts = Checkpoints(tmp_path / "checkpoints", keep=2)
    settings = {"config": {"lr": 0.1, "epochs": 5}, "data": "abc"}
    for epoch, b in enumerate(batches[:3], start=1):
        stepper.backward(_loss(model, b))
        ckpts.save(epoch=epoch, tensors=dict(model.named_parameters()), stepper=stepper, settings=settings,
                   extra={"rows": [epoch, math.inf]})
    assert [e for e, _ in ckpts.found()] == [2, 3]  # the oldest is dropped
    state = json.loads((ckpts.found()[-1][1] / "state.json").read_text())
    files = {name: sha256_file(ckpts.found()[-1][1] / name) for name in ("trainable.safetensors", "optimizer.pt")}
    assert state == {"epochs_done": 3, "steps_done": 3, "schedule_hash": stable_hash(settings),
                     "settings": settings, "extra": {"rows": [3, math.inf]}, "sha256": files}
    for b in batches[3:]:
        stepper.backward(_loss(model, b))

    fresh = _Tiny()
    resumed = _stepper(fresh)
    back = ckpts.restore(ckpts.found()[-1][1], tensors=dict(fresh.named_parameters()), stepper=resumed,
                         settings=settings)
    assert back.epochs_done == 3 and back.extra == {"rows": [3, math.inf]} and resumed.step == 3
    for b in batches[3:]:
        resumed.backward(_loss(fresh, b))
    assert resumed.step == stepper.step == 5 and resumed.lr == stepper.lr
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)  # bit-identical to the uninterrupted run
    last = ckpts.found()[-1][1]
    other = {"config": {"lr": 0.2, "epochs": 5}, "data": "abc", "seed": 1}
    with pytest.raises(ConfigError) as err:
        ckpts.restore(last, tensors=dict(fresh.named_parameters()), stepper=resumed, settings=other)
    assert str(err.value) == (
        f"{last}: was written by a run with other settings (config.lr: 0.1 -> 0.2; seed: "
        f'"(not set)" -> 1); resume with the same settings or start the run over: remove {ckpts.root} or choose '
        "another --out"
    )
    # a checkpoint from before the settings were recorded still names its hash
    state.pop("settings")
    (last / "state.json").write_text(json.dumps(state))
    with pytest.raises(ConfigError, match=f"settings hash {stable_hash(settings)} -> {stable_hash(other)}"):
        ckpts.restore(last, tensors=dict(fresh.named_parameters()), stepper=resumed, settings=other)
    (last / "optimizer.pt").write_bytes(b"not a pickle")
    with pytest.raises(ModelError, match=r"optimizer.pt: not a weight file \(neither safetensors nor a PyTorch checkpoint\)"):
        ckpts.restore(last, tensors=dict(fresh.named_parameters()), stepper=resumed, settings=settings)



def test_a_checkpoint_whose_weights_changed_since_is_named_and_not_restored(tmp_path):
    """One flipped bit in the trainable tensors leaves the file readable; the sha256 that
    state.json records finds it before anything is restored. A checkpoint without the record
    (written before it was kept) restores unchecked."""
    model, fresh = _Tiny(), _Tiny()
    stepper, resumed = _stepper(model), _stepper(fresh)
    stepper.backward(_loss(model, _batches(1)[0]))
    ckpts = Checkpoints(tmp_path / "checkpoints")
    last = ckpts.save(epoch=1, tensors=dict(model.named_parameters()), stepper=stepper, settings={})
    weights = last / "trainable.safetensors"
    recorded = json.loads((last / "state.json").read_text())["sha256"]["trainable.safetensors"]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # an exponent bit of the last value: still finite
    weights.write_bytes(bytes(data))
    before = [p.clone() for p in fresh.parameters()]
    with pytest.raises(ModelError) as err:
        ckpts.restore(last, tensors=dict(fresh.named_parameters()), stepper=resumed, settings={})
    assert str(err.value) == (
        f"{weights}: checksum mismatch: its sha256 is {sha256_file(weights)}, {last / 'state.json'} records "
        f"{recorded}: damaged since it was written; remove {last} to resume from the checkpoint before it, or "
        "start the run over"
    )
    assert resumed.step == 0 and all(torch.equal(p, q) for p, q in zip(before, fresh.parameters()))
    state = json.loads((last / "state.json").read_text())
    del state["sha256"]
    (last / "state.json").write_text(json.dumps(state))
    assert ckpts.restore(last, tensors=dict(fresh.named_parameters()), stepper=resumed, settings={}).epochs_done == 1

def test_epoch_generator_is_a_function_of_seed_epoch_and_stream():
    def draw(seed: int, epoch: int, stream: int = 31337) -> list[float]:
        return torch.rand(4, generator=epoch_generator(seed, epoch, stream=stream)).tolist()

    assert draw(0, 3) == draw(0, 3)
    assert len({tuple(draw(*a)) for a in [(0, 3), (1, 3), (0, 4), (0, 3, 1)]}) == 4


def test_loader_workers_leave_one_cpu_and_cap_at_eight(monkeypatch):
    for cpus, workers in ((1, 0), (2, 1), (5, 4), (9, 8), (64, 8)):
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", str(cpus))
        assert loader_workers() == workers


def test_csv_log_round_trip(tmp_path):
    log = CsvLog(tmp_path / "log.csv", ("epoch", "loss", "lr"), int_columns=frozenset({"epoch"}))
    assert log.read() == []
    rows = [{"epoch": 0.0, "loss": math.nan, "lr": 0.0}, {"epoch": 1.0, "loss": 0.1 + 0.2, "lr": 1e-3}]
    log.write(rows)
    assert (tmp_path / "log.csv").read_text().splitlines() == [
        "epoch,loss,lr", "0,nan,0.0", "1,0.30000000000000004,0.001"]
    back = log.read()
    assert back[1] == rows[1] and math.isnan(back[0]["loss"])
    log.write(rows[1:])
    assert len(log.read()) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["log.csv"]


def _run_best(losses: list[float], **kw) -> tuple[BestState, int, nn.Module]:
    """Epochs whose weights are the epoch number; the last epoch run."""
    model = nn.Linear(1, 1)
    best = BestState(model, **kw)
    for epoch, loss in enumerate(losses):
        with torch.no_grad():
            model.weight.fill_(epoch)
        best.update(epoch, loss)
        if best.should_stop(epoch):
            break
    best.restore()
    return best, epoch, model


def test_early_stopping_waits_for_min_epochs_and_restores_the_best():
    losses = [1.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.4, 1.0, 1.0, 1.0]
    best, last, model = _run_best(losses, patience=2)
    assert (best.epoch, best.loss, last) == (1, 0.5, 3)
    assert float(model.weight.detach()) == 1.0  # epoch 1's weights are back
    best, last, model = _run_best(losses, patience=2, min_epochs=6)
    assert (best.epoch, last) == (1, 5)  # patience ran out at epoch 3, but 6 epochs must run
    best, last, model = _run_best(losses, patience=2, min_epochs=7)
    assert (best.epoch, last, float(model.weight.detach())) == (6, 8, 6.0)  # epoch 6 improved, two more ran
    best, last, _ = _run_best(losses)
    assert (best.epoch, last) == (6, 9)  # without patience every epoch runs
    best, _, _ = _run_best([1.0, 1.0 - 1e-7, 0.9], min_delta=1e-6)
    assert best.epoch == 2  # an improvement within min_delta does not count


def test_best_state_without_a_finite_loss_is_a_clear_error():
    with pytest.raises(ModelError, match="never finite"):
        _run_best([math.nan, math.nan])


def test_best_state_carries_over_a_resume():
    """A BestState rebuilt from another's summary and kept tensors stops and restores as it would."""
    losses = [1.0, 0.5, 0.6, 0.7, 0.8]
    model = nn.Linear(1, 1)
    first = BestState(model, patience=3)
    for epoch, loss in enumerate(losses[:3]):
        with torch.no_grad():
            model.weight.fill_(epoch)
        first.update(epoch, loss)
    assert first.summary() == {"epoch": 1, "loss": 0.5}
    again = BestState(model, patience=3)
    kept = again.kept_tensors()  # a copy of the current state (epoch 2), to be overwritten
    assert float(kept["weight"]) == 2.0
    for k, v in first.kept_tensors().items():
        kept[k].copy_(v)
    again.load_summary(first.summary())
    stops = []
    for epoch, loss in enumerate(losses[3:], start=3):
        again.update(epoch, loss)
        stops.append(again.should_stop(epoch))
    assert stops == [False, True] and again.epoch == 1
    again.restore()
    assert float(model.weight.detach()) == 1.0


def test_a_log_that_is_not_the_runs_own_is_one_line(tmp_path):
    from wsitools.errors import ConfigError

    log = CsvLog(tmp_path / "log.csv", ("epoch", "step", "loss"), int_columns=frozenset({"epoch", "step"}))
    log.write([{"epoch": 0, "step": 0, "loss": 0.5}])
    assert log.read() == [{"epoch": 0.0, "step": 0.0, "loss": 0.5}]
    (tmp_path / "log.csv").write_text("epoch,step,loss\nabc,def,ghi\n")
    with pytest.raises(ConfigError, match=r"log\.csv: not the log this run writes \(could not convert"):
        log.read()
    (tmp_path / "log.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ConfigError, match=r"log\.csv: not the log this run writes \(columns a, b\)"):
        log.read()


def test_a_run_folder_that_is_a_file_is_refused_before_any_work(tmp_path):
    from wsitools.errors import ConfigError
    from wsitools.training import check_run_folder

    (tmp_path / "out").write_text("x")
    with pytest.raises(ConfigError, match=r"out: is a file, where the PathoTune run's folder goes; choose another --out$"):
        check_run_folder(tmp_path / "out", own=("log.csv",), kind="PathoTune")
    check_run_folder(tmp_path / "new", own=("log.csv",), kind="PathoTune")  # not there yet: fine


def test_a_refused_resume_names_the_stores_added_removed_and_changed_not_both_lists():
    """A cohort of hundreds of stores printed whole, twice, on one line said nothing of what changed."""
    from wsitools.training import settings_change

    before = {"stores": [[f"/t/s{i:03d}.zarr", "h", 10] for i in range(300)], "seed": 1}
    now = {"stores": [[f"/t/s{i:03d}.zarr", "h2" if i == 7 else "h", 10] for i in range(2, 305)], "seed": 1}
    assert settings_change(written=before, written_hash=stable_hash(before), settings=now) == (
        "stores: 5 added (/t/s300.zarr, /t/s301.zarr, /t/s302.zarr and 2 more), 2 removed (/t/s000.zarr, "
        "/t/s001.zarr), 1 changed (/t/s007.zarr)")
    # lists of values stay whole
    assert settings_change(written={"betas": [0.9, 0.95]}, written_hash="x", settings={"betas": [0.9, 0.99]}) == (
        "betas: [0.9, 0.95] -> [0.9, 0.99]")


def test_a_list_of_records_one_run_did_not_record_is_named_by_its_records():
    """A checkpoint recording no image files, resumed on a folder of thousands, named them all on one line."""
    from wsitools.training import settings_change

    before = {"data": {"tiles": "h"}}
    now = {"data": {"tiles": "h", "images": [[f"/d/a/{i}.png", "f"] for i in range(40)]}}
    assert settings_change(written=before, written_hash=stable_hash(before), settings=now) == (
        "data.images: 40 added (/d/a/0.png, /d/a/1.png, /d/a/2.png and 37 more)")
    assert settings_change(written={"x": None}, written_hash="x", settings={"x": [["a", 1]]}) == "x: 1 added (a)"
    assert settings_change(written={}, written_hash="x", settings={"x": []}) == 'x: "(not set)" -> []'


def test_clear_outputs_removes_only_full_matches_and_names_them(tmp_path, caplog):
    from wsitools.training import clear_outputs

    for name in ("card.yaml", "card.yaml.bak", "my-card.yaml", "log.csv", "previews/epoch-0002.png", "previews/x.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("")
    removed = clear_outputs(tmp_path, [r"card\.yaml", r"log\.csv", r"previews/epoch-\d{4,}\.png"])
    assert [p.relative_to(tmp_path).as_posix() for p in removed] == ["card.yaml", "log.csv", "previews/epoch-0002.png"]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        "card.yaml.bak", "my-card.yaml", "previews/x.png"]
    assert "the outputs of an earlier run there are removed: card.yaml, log.csv, previews/epoch-0002.png" in caplog.text


def test_earlier_cards_are_the_cards_naming_a_weight_file_of_the_role_beside_them(tmp_path):
    from wsitools.training import earlier_cards

    files = {
        "a.yaml": "name: a\nweights: [{role: backbone, file: /w/vit.pth}, {role: prompts, file: a_promptstate.pth}]\n",
        "b.yaml": "name: b\nweights: [{role: prompts, file: /elsewhere/b_promptstate.pth}]\n",  # not beside it
        "c.yaml": "name: c\nweights: [{role: pathotune, file: pathotune.safetensors}]\n",  # another role
        "read.yaml": "name: read\nweights: [{role: prompts, file: read_promptstate.pth}]\n",  # this run reads it
        "task.yaml": "name: t\nclasses: {x: an x}\n",
        "broken.yaml": "weights: [\n",
        "list.yaml": "- 1\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert earlier_cards(tmp_path, role="prompts", keep=[tmp_path / "read.yaml"]) == ["a.yaml", "a_promptstate.pth"]
    assert earlier_cards(tmp_path / "absent", role="prompts") == []


def test_the_precision_a_resume_compares_is_the_arithmetic_run():
    model = _Tiny()
    opt = adamw(model, lr=0.1, weight_decay=0.0)
    schedule = Schedule(0.1)
    assert [Stepper(opt, schedule=schedule, device=torch.device("cpu"), precision=p).precision
            for p in ("auto", "fp32")] == ["fp32", "fp32"]
