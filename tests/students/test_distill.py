"""The student distillation loop (medkd.students.distill.distill) on tiny synthetic data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from medkd.data.meta import DatasetMeta
from medkd.students.distill import (
    DistillConfig,
    TrainingRun,
    array_teacher_logits,
    average_state_dicts,
    build_student,
    distill,
    recalibrate_batchnorm,
)

META = DatasetMeta(
    task="classification", multilabel=False, spatial_dims=2, in_channels=1, num_classes=2, image_size=[16, 16]
)
N = 48


def tiny_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images whose class is where a bright square sits (left/right), and two teachers' logits."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, N)
    images = rng.normal(0.0, 0.3, (N, 1, 16, 16)).astype(np.float32)
    for i, label in enumerate(labels):
        images[i, 0, 5:11, (2 if label == 0 else 9) : (2 if label == 0 else 9) + 5] += 1.5
    signal = np.where(labels == 1, 1.0, -1.0)[:, None] * np.array([-1.5, 1.5])
    teachers = np.stack([signal + rng.normal(0, 0.5, signal.shape) for _ in range(2)]).astype(np.float32)
    return images, labels[:, None].astype(np.int64), teachers


def config(**overrides) -> DistillConfig:
    base = {"student": "resnet_tiny", "width": 0.25, "epochs": 6, "batch_size": 16, "lr": 1e-2, "seed": 0}
    return DistillConfig(**{**base, **overrides})


def test_kd_loss_decreases_with_teacher_logits():
    images, labels, teachers = tiny_data()
    cfg = config(alpha=0.3, temperature=4.0)
    model = build_student(META, cfg)
    history = distill(
        model, cfg, train_images=images, train_labels=labels, teacher_logits=array_teacher_logits(teachers), meta=META
    )
    assert len(history) == cfg.epochs
    kd = [record["train_kd"] for record in history]
    assert all(np.isfinite(kd))
    assert kd[-1] < kd[0]
    assert not model.training  # returned in eval mode


def test_alpha_one_trains_on_hard_labels_without_teacher_logits():
    images, labels, _ = tiny_data()
    cfg = config(alpha=1.0, epochs=2)
    model = build_student(META, cfg)
    before = [p.detach().clone() for p in model.parameters()]
    history = distill(
        model,
        cfg,
        train_images=images,
        train_labels=labels,
        teacher_logits=None,
        meta=META,
        val_images=images[:16],
        val_labels=labels[:16],
    )
    assert [r["epoch"] for r in history] == [1, 2]
    assert "train_ce" in history[0] and "train_kd" not in history[0]
    assert history[-1]["val_auc"] >= 0.9  # the square's side is learnt (measured 1.0 on seeds 0-2)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.99])
def test_missing_teacher_logits_with_kd_weight_is_an_error(alpha):
    images, labels, _ = tiny_data()
    cfg = config(alpha=alpha, epochs=1)
    with pytest.raises(ValueError, match="teacher_logits"):
        distill(build_student(META, cfg), cfg, train_images=images, train_labels=labels, teacher_logits=None, meta=META)


def test_same_seed_gives_the_same_student():
    images, labels, teachers = tiny_data()
    cfg = config(alpha=0.5, epochs=1)
    weights = []
    for noise in range(2):
        torch.randn(noise + 1)  # a different global RNG state: the seed alone decides the init
        model = build_student(META, cfg)
        distill(
            model,
            cfg,
            train_images=images,
            train_labels=labels,
            teacher_logits=array_teacher_logits(teachers),
            meta=META,
        )
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])


@pytest.mark.parametrize("device", ["cpu", *(["cuda"] if torch.cuda.is_available() else [])])
def test_distill_trains_on_the_given_device_and_returns_the_student_on_the_cpu(device):
    """A trial that holds a GPU passes ``device="cuda"``; pruning and export then need the CPU model."""
    images, labels, teachers = tiny_data()
    cfg = config(alpha=0.5, epochs=1, ema_epochs=1.0)
    data = {"train_images": images, "train_labels": labels, "teacher_logits": array_teacher_logits(teachers)}
    default, placed = build_student(META, cfg), build_student(META, cfg)
    distill(default, cfg, meta=META, **data)
    history = distill(placed, cfg, meta=META, val_images=images, val_labels=labels, device=torch.device(device), **data)
    assert {p.device.type for p in placed.parameters()} == {"cpu"}
    assert np.isfinite(history[-1]["val_auc"]) and np.isfinite(history[-1]["train_loss"])
    if device == "cpu":  # the same student as without the argument
        assert torch.equal(_flat(default), _flat(placed))


def _flat(model) -> torch.Tensor:
    return torch.cat([t.detach().flatten().float() for t in model.state_dict().values()])


def test_weight_averaging_validates_and_returns_the_averaged_weights():
    images, labels, teachers = tiny_data()
    runs = {}
    for ema_epochs in (None, 0.01, 2.0):  # off; a horizon under one step (decay 0); two epochs
        cfg = config(alpha=0.5, epochs=3, ema_epochs=ema_epochs)
        model = build_student(META, cfg)
        history = distill(
            model,
            cfg,
            train_images=images,
            train_labels=labels,
            teacher_logits=array_teacher_logits(teachers),
            meta=META,
            val_images=images[:16],
            val_labels=labels[:16],
        )
        runs[ema_epochs] = (model, history)
    plain, averaged = runs[None][0], runs[2.0][0]
    # Decay 0 keeps only the last step: exactly the plain run (weights and BatchNorm statistics).
    torch.testing.assert_close(_flat(runs[0.01][0]), _flat(plain))
    # A real horizon returns other weights than the last step's, in eval mode ...
    assert not torch.allclose(_flat(averaged), _flat(plain))
    assert not averaged.training
    # ... and the last epoch's val score is the returned (averaged) model's.
    probs = torch.softmax(averaged(torch.from_numpy(images[:16])), dim=1)[:, 1].detach().numpy()
    assert runs[2.0][1][-1]["val_auc"] == pytest.approx(roc_auc_score(labels[:16, 0], probs), abs=1e-6)


def test_non_positive_student_ema_epochs_is_an_error():
    with pytest.raises(ValueError, match="ema_epochs"):
        config(ema_epochs=0)


def test_augment_callable_sees_every_training_batch_and_on_epoch_can_stop():
    images, labels, teachers = tiny_data()
    cfg = config(alpha=0.5, epochs=5)
    calls = []

    def augment(batch, masks):
        assert masks is None  # classification: labels are not geometric
        calls.append(batch.shape[0])
        return batch.flip(-1), masks

    history = distill(
        build_student(META, cfg),
        cfg,
        train_images=images,
        train_labels=labels,
        teacher_logits=array_teacher_logits(teachers),
        meta=META,
        augment=augment,
        on_epoch=lambda record: record["epoch"] == 2,
    )
    assert len(history) == 2
    assert sum(calls) == 2 * (N // cfg.batch_size) * cfg.batch_size


# --------------------------------------------------------------------------- cached views (FKD)


def two_views(n: int) -> list[list[dict]]:
    """View 0 flips every sample left-right; view 1 turns every sample a quarter."""
    flip = {"flip": [1], "rot90": 0, "affine": None, "gamma": None, "noise": None}
    turn = {"flip": [], "rot90": 1, "affine": None, "gamma": None, "noise": None}
    return [[dict(flip) for _ in range(n)], [dict(turn) for _ in range(n)]]


def test_cached_views_batch_applies_the_chosen_view_and_its_own_teacher_logits():
    from medkd.data import apply_view
    from medkd.students.distill import CachedViews

    images, labels, teachers = tiny_data()
    view_logits = [teachers + 10.0, teachers + 20.0]  # each view's logits are recognisable
    views = CachedViews(two_views(N), lambda k, idx: view_logits[k][:, idx])
    indices = np.array([0, 3, 5, 8, 13, 21])
    choice = np.array([0, 1, 2, 2, 1, 0])
    batch = torch.from_numpy(images[indices])
    out_images, out_labels, out_teachers = views.batch(
        indices, choice, batch, torch.from_numpy(labels[indices]), array_teacher_logits(teachers), segmentation=False
    )

    for row, (i, k) in enumerate(zip(indices, choice)):
        expected_image = images[i] if k == 0 else apply_view(images[i : i + 1], [views.params[k - 1][i]])[0]
        np.testing.assert_array_equal(out_images[row].numpy(), expected_image)
        expected_logits = teachers[:, i] if k == 0 else view_logits[k - 1][:, i]
        np.testing.assert_array_equal(out_teachers[:, row], expected_logits)
    assert torch.equal(out_labels, torch.from_numpy(labels[indices]))  # class labels do not move


def test_cached_views_move_segmentation_masks_with_the_images():
    from medkd.students.distill import CachedViews

    masks = np.zeros((4, 8, 8), dtype=np.int64)
    masks[:, 0, :] = 1  # top row
    images = masks[:, None].astype(np.float32)
    logits = np.zeros((1, 4, 2, 8, 8), np.float32)
    views = CachedViews(two_views(4), lambda k, idx: logits[:, idx])
    choice = np.array([0, 1, 2, 2])
    out_images, out_masks, _ = views.batch(
        np.arange(4),
        choice,
        torch.from_numpy(images),
        torch.from_numpy(masks),
        array_teacher_logits(logits),
        segmentation=True,
    )
    # Wherever the image went, the mask went too; a quarter turn moves the top row.
    assert torch.equal(out_images[:, 0].long(), out_masks)
    assert torch.equal(out_masks[0], torch.from_numpy(masks[0])) and not torch.equal(
        out_masks[2], torch.from_numpy(masks[2])
    )


def test_distill_with_cached_views_trains_on_every_view():
    from medkd.students.distill import CachedViews

    images, labels, teachers = tiny_data()
    seen: list[int] = []

    def view_logits(k: int, idx: np.ndarray) -> np.ndarray:
        seen.append(k)
        return teachers[:, idx]

    views = CachedViews(two_views(N), view_logits)
    cfg = config(alpha=0.3, epochs=4)
    history = distill(
        build_student(META, cfg),
        cfg,
        train_images=images,
        train_labels=labels,
        teacher_logits=array_teacher_logits(teachers),
        views=views,
        meta=META,
    )
    assert set(seen) == {0, 1}
    assert history[-1]["train_kd"] < history[0]["train_kd"]


def test_cached_views_bad_use_is_an_error():
    from medkd.students.distill import CachedViews

    images, labels, teachers = tiny_data()
    cfg = config(alpha=0.5, epochs=1)
    views = CachedViews(two_views(N), lambda k, idx: teachers[:, idx])
    kwargs = {"train_images": images, "train_labels": labels, "meta": META}
    with pytest.raises(ValueError, match="views need teacher_logits"):
        distill(build_student(META, config(alpha=1.0)), config(alpha=1.0), teacher_logits=None, views=views, **kwargs)
    with pytest.raises(ValueError, match="either augment"):
        distill(
            build_student(META, cfg),
            cfg,
            teacher_logits=array_teacher_logits(teachers),
            views=views,
            augment=lambda x, m: (x, m),
            **kwargs,
        )
    short = CachedViews(two_views(N - 1), lambda k, idx: teachers[:, idx])
    with pytest.raises(ValueError, match="cover 47 samples"):
        distill(build_student(META, cfg), cfg, teacher_logits=array_teacher_logits(teachers), views=short, **kwargs)
    with pytest.raises(ValueError, match="every sample"):
        CachedViews([two_views(N)[0], two_views(N - 1)[1]], lambda k, idx: teachers[:, idx])


def test_online_augmentation_with_segmentation_kd_is_an_error():
    meta = META.model_copy(update={"task": "segmentation", "num_classes": 2})
    images = np.zeros((8, 1, 16, 16), np.float32)
    masks = np.zeros((8, 16, 16), np.int64)
    logits = np.zeros((1, 8, 2, 16, 16), np.float32)
    cfg = config(student="unet_small", alpha=0.5, epochs=1, batch_size=4)
    with pytest.raises(ValueError, match="misaligns per-pixel KD targets"):
        distill(
            build_student(meta, cfg),
            cfg,
            train_images=images,
            train_labels=masks,
            meta=meta,
            teacher_logits=array_teacher_logits(logits),
            augment=lambda x, m: (x, m),
        )


def soup_run(branches: int, **overrides):
    images, labels, teachers = tiny_data()
    cfg = config(alpha=0.5, epochs=4, branches=branches, **{"fork_fraction": 0.5, **overrides})
    model = build_student(META, cfg)
    seen: list[dict] = []
    history = distill(
        model,
        cfg,
        train_images=images,
        train_labels=labels,
        teacher_logits=array_teacher_logits(teachers),
        meta=META,
        val_images=images[:16],
        val_labels=labels[:16],
        on_epoch=seen.append,
    )
    return model, history, seen


def test_weight_soup_forks_branches_and_serves_their_average():
    single, _, _ = soup_run(1)
    soup, history, seen = soup_run(3)
    # Two shared epochs (fork at half), then three branches finish epochs 3-4, then the soup's record.
    assert [(r["epoch"], r.get("branch")) for r in history[:-1]] == [(1, None), (2, None)] + [
        (epoch, branch) for branch in (1, 2, 3) for epoch in (3, 4)
    ]
    assert history[-1]["epoch"] == 4 and history[-1]["branches"] == 3 and seen == history
    # Each branch draws its own data order: the same epoch trains differently in each.
    losses = {r["branch"]: r["train_loss"] for r in history if r.get("epoch") == 4 and "branch" in r}
    assert len(set(losses.values())) == 3
    assert not torch.allclose(_flat(soup), _flat(single))
    assert not soup.training
    # The soup's record scores the returned model, and the same seed gives the same soup.
    probs = torch.softmax(soup(torch.from_numpy(tiny_data()[0][:16])), dim=1)[:, 1].detach().numpy()
    assert history[-1]["val_auc"] == pytest.approx(roc_auc_score(tiny_data()[1][:16, 0], probs), abs=1e-6)
    again, _, _ = soup_run(3)
    assert torch.equal(_flat(again), _flat(soup))


def test_weight_soup_with_weight_averaged_branches_and_a_stop_before_the_fork():
    _, history, _ = soup_run(2, ema_epochs=1.0)
    assert history[-1]["branches"] == 2 and history[-1]["val_auc"] >= 0.9  # measured 1.0
    images, labels, teachers = tiny_data()
    cfg = config(alpha=0.5, epochs=4, branches=2)
    history = distill(
        build_student(META, cfg),
        cfg,
        train_images=images,
        train_labels=labels,
        teacher_logits=array_teacher_logits(teachers),
        meta=META,
        on_epoch=lambda record: True,
    )
    assert history == [history[0]] and "branch" not in history[0]  # stopped (e.g. by ASHA): no branches


def test_a_forked_run_does_not_share_optimizer_state_with_its_trunk():
    images, labels, _ = tiny_data()
    cfg = config(alpha=1.0, epochs=2)
    trunk = TrainingRun.start(build_student(META, cfg), cfg, total_steps=10, steps_per_epoch=5)
    step(trunk, images, labels)
    moments = {k: v["exp_avg"].clone() for k, v in trunk.optimizer.state_dict()["state"].items()}
    branch = trunk.fork(1)
    step(branch, images, labels)
    assert all(torch.equal(trunk.optimizer.state_dict()["state"][k]["exp_avg"], v) for k, v in moments.items())
    assert branch.scheduler.last_epoch == 2 and trunk.scheduler.last_epoch == 1
    assert any(not torch.equal(a, b) for a, b in zip(trunk.model.parameters(), branch.model.parameters()))


def step(run: TrainingRun, images: np.ndarray, labels: np.ndarray) -> None:
    run.model.train()
    loss = torch.nn.functional.cross_entropy(run.model(torch.from_numpy(images[:16])), torch.from_numpy(labels[:16, 0]))
    run.optimizer.zero_grad()
    loss.backward()
    run.optimizer.step()
    run.scheduler.step()


def test_average_state_dicts_means_floats_and_keeps_counters():
    a = {"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(5)}
    b = {"w": torch.tensor([3.0, 5.0]), "n": torch.tensor(7)}
    soup = average_state_dicts([a, b])
    assert torch.equal(soup["w"], torch.tensor([2.0, 4.0])) and soup["n"].item() == 5
    with pytest.raises(ValueError, match="differ in keys.*'v'"):
        average_state_dicts([a, {"w": a["w"], "v": a["n"]}])
    with pytest.raises(ValueError, match="at least one"):
        average_state_dicts([])


def test_recalibrate_batchnorm_recomputes_statistics_over_the_images():
    images = np.random.default_rng(0).normal(2.0, 3.0, (40, 2, 4, 4)).astype(np.float32)
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(2))
    model[0].running_mean.fill_(-9.0)
    recalibrate_batchnorm(model, images, batch_size=40)
    torch.testing.assert_close(model[0].running_mean, torch.from_numpy(images.mean(axis=(0, 2, 3))), atol=1e-4, rtol=0)
    torch.testing.assert_close(
        model[0].running_var, torch.from_numpy(images.var(axis=(0, 2, 3), ddof=1)), atol=1e-3, rtol=0
    )
    assert not model.training


def test_bad_soup_settings_are_errors():
    with pytest.raises(ValueError, match="branches"):
        config(branches=0)
    with pytest.raises(ValueError, match="fork_fraction"):
        config(fork_fraction=1.0)


def first_epoch_kd(cfg: DistillConfig, teachers: np.ndarray) -> tuple[float, torch.nn.Module]:
    images, labels, _ = tiny_data()
    model = build_student(META, cfg)
    history = distill(
        model,
        cfg,
        train_images=images,
        train_labels=labels,
        teacher_logits=array_teacher_logits(teachers),
        meta=META,
        on_epoch=lambda record: True,  # stop after the first epoch
    )
    return history[0]["train_kd"], model


def test_the_training_loop_warms_dkd_up_by_epoch():
    # One step per epoch from the same start: epoch 1's KD term is exactly the warm-up factor times
    # Hinton KD's (binary DKD with tckd_weight 1 is Hinton KD); 24 epochs -> 2 warm-up epochs -> 0.5.
    _, _, teachers = tiny_data()
    one_step = {"batch_size": N, "epochs": 24, "alpha": 0.5}
    hinton, _ = first_epoch_kd(config(**one_step), teachers)
    dkd, _ = first_epoch_kd(config(**one_step, loss="dkd"), teachers)
    assert dkd == pytest.approx(0.5 * hinton, rel=1e-5)


def test_teacher_temperatures_divide_each_teachers_logits():
    _, _, teachers = tiny_data()
    scaled = teachers / np.array([2.0, 0.5], dtype=np.float32)[:, None, None]
    kd_scaled, by_hand = first_epoch_kd(config(alpha=0.5, epochs=1), scaled)
    kd_calibrated, calibrated = first_epoch_kd(config(alpha=0.5, epochs=1, teacher_temperatures=[2.0, 0.5]), teachers)
    kd_raw, _ = first_epoch_kd(config(alpha=0.5, epochs=1), teachers)
    assert kd_calibrated == pytest.approx(kd_scaled, rel=1e-6) and kd_calibrated != pytest.approx(kd_raw, rel=1e-3)
    assert all(torch.allclose(a, b) for a, b in zip(by_hand.state_dict().values(), calibrated.state_dict().values()))
    with pytest.raises(ValueError, match="teacher_temperatures has 1 values for 2 teachers"):
        first_epoch_kd(config(alpha=0.5, epochs=1, teacher_temperatures=[2.0]), teachers)
    with pytest.raises(ValueError, match="teacher_temperatures must be finite and > 0"):
        first_epoch_kd(config(alpha=0.5, epochs=1, teacher_temperatures=[2.0, 0.0]), teachers)
