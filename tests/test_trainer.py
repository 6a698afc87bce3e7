import pickle

import pytest
import torch

from dreamfusion.guidance.synthetic import SyntheticGuidance
from dreamfusion.trainer import CheckpointError, Trainer, TrainerCallback, read_checkpoint
from tests.conftest import tiny_config


def weights(trainer):
    return {k: v.clone() for k, v in trainer.field.state_dict().items()}


def test_resume_from_checkpoint_gives_identical_weights(tmp_path):
    config = tiny_config(iterations=10)
    straight = Trainer(config)
    straight.train()

    first = Trainer(config)
    first.train(until=4)
    first.save_checkpoint(tmp_path / "ckpt.pt")
    resumed = Trainer(config)
    resumed.load_checkpoint(tmp_path / "ckpt.pt")
    assert resumed.step == 4
    resumed.train()
    for key, value in weights(straight).items():
        torch.testing.assert_close(weights(resumed)[key], value, rtol=0, atol=0)
    # progress.png's rows from before the checkpoint survive it
    assert [step for step, _ in resumed.snapshots] == [step for step, _ in straight.snapshots] == list(range(10))


def test_progress_snapshots_are_evenly_spaced_and_leave_training_unchanged():
    plain = Trainer(tiny_config(iterations=12, extra=["export.progress_snapshots=0"]))
    watched = Trainer(tiny_config(iterations=12, extra=["export.progress_snapshots=4"]))
    plain.train()
    watched.train()
    assert plain.snapshots == []
    assert [step for step, _ in watched.snapshots] == [0, 3, 6, 9]
    row = watched.snapshots[0][1]
    assert row.dtype == torch.uint8 and row.shape == (16, 8 * 16, 3)
    assert not torch.equal(watched.snapshots[0][1], watched.snapshots[-1][1])  # the renders follow training
    for key, value in weights(plain).items():
        torch.testing.assert_close(weights(watched)[key], value, rtol=0, atol=0)


def test_callbacks_see_every_step_and_metrics():
    seen = []

    class Recorder(TrainerCallback):
        def on_step_end(self, trainer, metrics):
            seen.append((trainer.step, metrics))

    trainer = Trainer(tiny_config(iterations=3), callbacks=[Recorder()])
    trainer.train()
    assert [step for step, _ in seen] == [1, 2, 3]
    assert {"loss", "sds_loss", "timestep", "lr", "skipped_steps", "sample_fraction"} <= set(seen[-1][1])


def test_nan_guard_skips_and_counts_poisoned_steps():
    config = tiny_config(iterations=3)

    class PoisonedGuidance(SyntheticGuidance):
        def encode(self, images, progress=1.0):
            return super().encode(images) * float("nan")

    trainer = Trainer(config, guidance=PoisonedGuidance(config))
    before = weights(trainer)
    trainer.train()
    assert trainer.skipped_steps == 3
    for key, value in weights(trainer).items():
        assert torch.equal(value, before[key]), key


def test_checkpoints_load_without_pickle_code(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"format": 1, "payload": Exploit()}))
    with pytest.raises(CheckpointError):
        read_checkpoint(path)


def test_truncated_checkpoint_is_reported(tmp_path):
    trainer = Trainer(tiny_config(iterations=1))
    trainer.save_checkpoint(tmp_path / "ckpt.pt")
    data = (tmp_path / "ckpt.pt").read_bytes()
    (tmp_path / "ckpt.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        trainer.load_checkpoint(tmp_path / "ckpt.pt")


def test_checkpoint_from_another_architecture_is_refused(tmp_path):
    Trainer(tiny_config(iterations=1)).save_checkpoint(tmp_path / "ckpt.pt")
    other = Trainer(tiny_config(iterations=1, extra=["field.levels=5"]))
    with pytest.raises(CheckpointError):
        other.load_checkpoint(tmp_path / "ckpt.pt")
