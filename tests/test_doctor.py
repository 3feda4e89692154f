"""bnlab doctor: finds planted problems, names the layer, and changes nothing."""

import copy

import torch
from torch import nn

import bnlab
from bnlab import cli
from bnlab.models import fig1_mlp
from bnlab.tools.doctor import doctor


def _trained_model():
    torch.manual_seed(0)
    model = fig1_mlp()
    x = torch.rand(256, 784)
    for _ in range(40):  # enough EMA updates (momentum 0.1) to forget the initial statistics
        for i in range(0, 256, 32):
            model(x[i : i + 32])
    return model, [x[i : i + 32] for i in range(0, 256, 32)]


def test_a_healthy_model_has_no_problems():
    model, batches = _trained_model()
    model.eval()
    report = doctor(model, batches)
    assert not [f for f in report.findings if f.severity == "problem"], report.format()
    assert [d.name for d in report.layers] == ["1", "4", "7"]
    assert all(d.values_per_channel == 32 for d in report.layers)


def test_a_planted_train_eval_mismatch_is_found_and_named():
    model, batches = _trained_model()
    with torch.no_grad():
        model[4].running_mean += 5 * model[4].running_var.sqrt()  # layer '4' now disagrees with the data
    before = copy.deepcopy(model.state_dict())
    report = doctor(model, batches)
    problems = [f for f in report.findings if f.severity == "problem"]
    assert [f.layer for f in problems] == ["4"], report.format()
    assert "do not match the data" in problems[0].what and "precise_bn" in problems[0].fix
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), "doctor must not change the model"


def test_static_findings_without_data():
    model = nn.Sequential(
        nn.Linear(4, 4), nn.BatchNorm1d(4, momentum=0.99), nn.BatchNorm1d(4, track_running_stats=False)
    )
    report = doctor(model)
    text = report.format()
    kinds = {(f.layer, f.severity) for f in report.findings}
    assert ("1", "problem") in kinds and "never updated" in text  # fresh statistics
    assert "Keras/Flax momentum" in text and "use 0.01" in text
    assert ("2", "warning") in kinds and "track_running_stats=False" in text


def test_tiny_effective_batch_is_flagged():
    model = bnlab.nn.convert(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)))
    batches = [torch.randn(2, 1, 4, 4) for _ in range(3)]
    model(batches[0])
    report = doctor(model, batches)
    assert report.layers[0].values_per_channel == 8
    assert any("tiny effective batch" in f.what for f in report.findings)


def test_cli_doctor_names_the_layer(tmp_path, synthetic_data, capsys):
    model, _ = _trained_model()
    with torch.no_grad():
        model[7].running_var *= 50
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    argv = ["doctor", "bnlab.models:fig1_mlp", "--checkpoint", str(path), "--data-dir", str(synthetic_data)]
    assert cli.main([*argv, "--batches", "3"]) == 1
    out = capsys.readouterr().out
    assert "[problem] 7: running statistics do not match the data" in out
    assert cli.main(["doctor", "no_such_module:f"]) == 2
