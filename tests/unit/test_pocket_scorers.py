"""The pocket scorers, with the committed weights, on renders the network never saw."""

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dreambooth.eval.metrics import mean_cross_cosine
from dreambooth.pocket._scorer_net import augment, fit_net, supcon_loss
from dreambooth.pocket.scorers import WEIGHTS, PocketScorer, as_tensor
from dreambooth.pocket.subjects import SUBJECTS, make_subject, subject_photos
from dreambooth.pocket.world import COLOURS, PATTERNS, Scene, render, sample_scenes

# Held-out subjects: the ready ones and make_subject seeds below the training range.
TEST_SUBJECTS = [*SUBJECTS.values(), *(make_subject(seed) for seed in range(2))]


@pytest.fixture(scope="module")
def scorer() -> PocketScorer:
    return PocketScorer.load()


def _down_up(x: torch.Tensor) -> torch.Tensor:
    """What the base stage can carry: antialiased 64 -> 32, then bilinear 32 -> 64."""
    small = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True)
    return F.interpolate(small, size=(64, 64), mode="bilinear")


def _ordinary_like(subject, n: int, seed: int) -> np.ndarray:
    """n ordinary objects of the subject's class, every colour and pattern, in random scenes."""
    scenes = sample_scenes(n, np.random.default_rng(seed))
    looks = [(c, p) for c in COLOURS for p in PATTERNS]
    return render(
        [
            Scene(subject.cls, *looks[i % len(looks)], s.size, s.position, s.view, s.context, s.variant)
            for i, s in enumerate(scenes)
        ]
    )


def _photos(subject, seed: int = 1) -> np.ndarray:
    return np.stack([np.asarray(p) for p in subject_photos(subject, n=5, seed=seed)])


def test_weights_are_small_and_calibrated(scorer):
    assert WEIGHTS.stat().st_size < 2 * 2**20
    assert 0.0 < scorer.threshold < 1.0


@pytest.mark.parametrize("resolution", ["64", "32", "32 upsampled to 64", "generated-like"])
def test_class_and_context_are_right_on_heldout_renders(scorer, resolution):
    scenes = sample_scenes(400, np.random.default_rng(2024))
    x = as_tensor(render(scenes))
    x = {
        "64": x,
        "32": F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True),
        "32 upsampled to 64": _down_up(x),
        "generated-like": augment(x, torch.Generator().manual_seed(5)),
    }[resolution]
    pred = scorer.classify(x)
    bar = 0.9 if resolution == "generated-like" else 0.95
    assert np.mean([p == s.cls for p, s in zip(pred.cls, scenes, strict=True)]) >= bar
    assert np.mean([p == s.context for p, s in zip(pred.context, scenes, strict=True)]) >= bar
    torch.testing.assert_close(pred.cls_prob.sum(1), torch.ones(len(scenes)))


def test_subject_photos_are_the_subject_and_ordinary_objects_are_not(scorer):
    for k, subject in enumerate(TEST_SUBJECTS):
        verdict = scorer.is_subject(
            np.concatenate([_photos(subject), _ordinary_like(subject, 24, seed=k)]), subject
        )
        assert verdict[:5].all() and not verdict[5:].any(), subject.name


def test_embedding_groups_a_subject_apart_from_its_class(scorer):
    for k, subject in enumerate(TEST_SUBJECTS):
        z = scorer.embed(_photos(subject))  # [5, 64]
        torch.testing.assert_close(z.norm(dim=1), torch.ones(5))
        same = (z @ z.T)[~torch.eye(5, dtype=torch.bool)].mean()
        cross = (z @ scorer.embed(_ordinary_like(subject, 24, seed=k)).T).mean()
        assert same > cross + 0.3, subject.name
    # Subject fidelity, the paper's DINO metric: another set of photos beats ordinary cubes.
    photos, other_photos = _photos(SUBJECTS["checker_cube"], 1), _photos(SUBJECTS["checker_cube"], 2)
    ordinary = _ordinary_like(SUBJECTS["checker_cube"], 5, seed=9)
    fidelity = {
        name: mean_cross_cosine(scorer.embed(x), scorer.embed(photos))
        for name, x in (("subject", other_photos), ("ordinary", ordinary))
    }
    assert fidelity["subject"] > fidelity["ordinary"] + 0.3


def test_diversity_separates_a_class_prior_from_a_collapsed_one(scorer):
    prior = _ordinary_like(SUBJECTS["checker_cube"], 12, seed=3)
    collapsed = _photos(SUBJECTS["checker_cube"])
    assert scorer.diversity(prior) > scorer.diversity(collapsed) + 0.2
    with pytest.raises(ValueError, match="at least 2"):
        scorer.diversity(collapsed[:1])


def test_detail_score_needs_the_64x64_glyph(scorer):
    noise = torch.Generator().manual_seed(0)
    for subject in TEST_SUBJECTS:
        x = as_tensor(_photos(subject))  # [5, 3, 64, 64]
        noisy = (x + 0.03 * torch.randn(x.shape, generator=noise)).clamp(0, 1)
        # Right paint and badge, wrong glyph: there is detail, but not the subject's.
        impostor = replace(
            subject, glyph=next(s.glyph for s in SUBJECTS.values() if s.glyph != subject.glyph)
        )
        wrong = as_tensor(render([impostor.scene(c) for c in ("snow", "grass", "beach")]))
        true, blurry, noisy, wrong = scorer.detail_score(
            torch.cat([x, _down_up(x), noisy, wrong]), subject
        ).split(5)
        assert true.min() > 0.9 and (blurry < true - 0.3).all() and (noisy > blurry + 0.2).all(), subject.name
        assert (wrong < true.min() - 0.3).all(), subject.name
    with pytest.raises(ValueError, match="64x64"):
        scorer.detail_score(F.interpolate(x, size=(32, 32)), subject)


def test_inputs_in_every_accepted_form_score_alike(scorer):
    photos = subject_photos(SUBJECTS["twotone_ball"], n=3)
    arrays = np.stack([np.asarray(p) for p in photos])
    torch.testing.assert_close(scorer.embed(photos), scorer.embed(arrays))
    torch.testing.assert_close(scorer.embed(as_tensor(arrays)), scorer.embed(arrays))
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        scorer.embed(as_tensor(arrays) * 2 - 1)
    with pytest.raises(ValueError, match="uint8"):
        scorer.embed(arrays.astype(np.float32))


def test_supcon_loss_rewards_grouping_by_identity():
    labels = torch.tensor([0, 0, 1, 1])
    grouped = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    mixed = grouped[[0, 2, 1, 3]]
    assert supcon_loss(grouped, labels) < supcon_loss(mixed, labels) - 1.0


def test_training_is_deterministic_in_its_seed():
    a, b = fit_net(seed=1, steps=1, log_every=0), fit_net(seed=1, steps=1, log_every=0)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)
