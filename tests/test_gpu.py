"""On CUDA (deselected without it): the training step waits for nothing, every measure runs on the GPU model, and
a checkpoint trained there loads on a CPU with the same logits."""

import warnings

import pytest
import torch

from model import ModelConfig, TrainConfig, Trainer, load_checkpoint
from model.config import DataConfig
from model.data import prepare_data
from model.measures import Probe, measure_model, measure_names

pytestmark = pytest.mark.gpu


@pytest.fixture
def trainer(reviews_file):
    data = prepare_data(DataConfig(dataset=str(reviews_file), tokenizer="bytes"), seq_len=32)
    model_cfg = ModelConfig(vocab_size=data.tokenizer.vocab_size, d_model=64, n_heads=4, n_layers=2, seq_len=32)
    train_cfg = TrainConfig(batch_size=16, max_tokens=16 * 32 * 40, eval_every_tokens=16 * 32 * 20, device="cuda")
    return Trainer(model_cfg, train_cfg, data.train, data.test, data.tokenizer)


def test_the_training_step_never_waits_for_the_gpu(trainer):
    trainer.train_steps(2)  # warm up: the epoch's permutation is copied once, kernels load
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train_steps(22)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]  # the one read of the non-finite flag, after the steps
    assert not torch.backends.cuda.matmul.allow_tf32  # TF32 for the step only: analysis reads full fp32


def test_every_measure_runs_on_the_gpu_model_and_reads_as_on_a_cpu(trainer):
    trainer.train_iteration()
    probe = Probe(trainer.eval_windows.cpu())
    names = tuple(name for name in measure_names() if name != "circuit:text")
    on_gpu = measure_model(trainer.model, probe, names)
    on_cpu = measure_model(load_cpu_copy(trainer), probe, tuple(n for n in names if n != "llc"))
    for name, rows in on_cpu.items():
        gpu_values = {row[:3] + tuple(row[4:]): row[3] for row in on_gpu[name]}
        for row in rows:
            assert gpu_values[row[:3] + tuple(row[4:])] == pytest.approx(row[3], rel=1e-3, abs=1e-3), (name, row)
    assert any(row[2] == "llc" for row in on_gpu["llc"])


def load_cpu_copy(trainer):
    model = type(trainer.model)(trainer.model_cfg)
    model.load_state_dict({k: v.cpu() for k, v in trainer.model.state_dict().items()})
    return model.eval()


def test_a_checkpoint_trained_on_the_gpu_loads_on_a_cpu_with_the_same_logits(trainer, tmp_path):
    trainer.train_iteration()
    trainer.save_checkpoint(tmp_path / "checkpoint")
    net = load_checkpoint(tmp_path / "checkpoint")
    tokens = trainer.eval_windows[:4, :-1].long()
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(tokens).float().cpu()
        got = net(tokens.cpu()).float()
    assert next(net.parameters()).device.type == "cpu"
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
