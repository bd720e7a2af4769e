import numpy as np
import pytest

from evomerge.config import OptimizerConfig
from evomerge.search.controllers import default_popsize, loads, make_controller


def run(kind: str, seed: int, generations: int = 4) -> list[np.ndarray]:
    ctrl = make_controller(OptimizerConfig(kind=kind, seed=seed, popsize=6), np.full(5, 0.5), n_workers=2)
    seen = []
    for _ in range(generations):
        xs = ctrl.ask_generation()
        seen += xs
        ctrl.tell(xs, [-float(np.sum((x - 0.8) ** 2)) for x in xs])
    return seen


@pytest.mark.parametrize("kind", ["cmaes", "random"])
def test_same_seed_same_candidates(kind: str) -> None:
    a, b, c = run(kind, 1), run(kind, 1), run(kind, 2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert all(((x >= 0) & (x <= 1)).all() for x in a)


def test_cmaes_improves_on_a_simple_objective() -> None:
    ctrl = make_controller(OptimizerConfig(seed=0, popsize=8), np.full(4, 0.2), n_workers=1)
    for _ in range(25):
        xs = ctrl.ask_generation()
        ctrl.tell(xs, [-float(np.sum((x - 0.8) ** 2)) for x in xs])
    assert np.allclose(ctrl.es.result.xfavorite, 0.8, atol=0.1)


def test_failed_candidates_are_tolerated_and_state_round_trips() -> None:
    ctrl = make_controller(OptimizerConfig(seed=0, popsize=4), np.full(3, 0.5), n_workers=1)
    xs = ctrl.ask_generation()
    ctrl.tell(xs, [1.0, None, 0.5, None])
    ctrl.tell(ctrl.ask_generation(), [None] * 4)  # a generation that failed entirely must not crash
    copy = loads(ctrl.dumps())
    assert all(np.array_equal(x, y) for x, y in zip(copy.ask_generation(), ctrl.ask_generation()))


def test_default_popsize_is_a_multiple_of_workers() -> None:
    assert default_popsize(8, 1) == 10
    assert default_popsize(8, 4) == 12
    assert default_popsize(8, 16) == 32  # at least 2x the workers, so lookahead fills generation tails


def test_restored_checkpoint_asks_what_the_original_asks() -> None:
    """pycma draws from numpy's global RNG; the controller must carry that state in its pickle."""
    ctrl = make_controller(OptimizerConfig(seed=3, popsize=4), np.full(3, 0.5), n_workers=1)
    ctrl.tell(ctrl.ask_generation(), [0.1, 0.2, 0.3, 0.4])
    saved = ctrl.dumps()
    np.random.seed(12345)  # someone else uses the global RNG in between
    original = ctrl.ask_generation()
    np.random.rand(7)
    restored = loads(saved).ask_generation()
    assert all(np.array_equal(a, b) for a, b in zip(original, restored))


def test_lookahead_candidates_open_the_next_generation_and_survive_a_checkpoint() -> None:
    """The early candidates asked with generation g are the first of g+1; a pickled controller keeps them,
    so a study resumed from that checkpoint asks exactly what the original run asked."""
    ctrl = make_controller(OptimizerConfig(seed=5, popsize=6, lookahead=3), np.full(4, 0.5), n_workers=2)
    first = ctrl.ask_generation()
    early = [x.copy() for x in ctrl.early]
    assert len(first) == 6 and len(early) == 3
    ctrl.tell(first, [-float(np.sum((x - 0.8) ** 2)) for x in first])
    saved = ctrl.dumps()
    second = ctrl.ask_generation()
    assert all(np.array_equal(a, b) for a, b in zip(second[:3], early))
    assert not any(np.array_equal(a, b) for a in second[3:] for b in early)
    restored = loads(saved)
    assert all(np.array_equal(a, b) for a, b in zip(restored.ask_generation(), second))
    assert all(np.array_equal(a, b) for a, b in zip(restored.early, ctrl.early))


def test_lookahead_defaults_to_half_a_generation_with_several_workers() -> None:
    assert make_controller(OptimizerConfig(popsize=8), np.full(3, 0.5), n_workers=1).lookahead == 0
    assert make_controller(OptimizerConfig(popsize=8), np.full(3, 0.5), n_workers=4).lookahead == 4
    assert make_controller(OptimizerConfig(popsize=8, lookahead=0), np.full(3, 0.5), n_workers=4).lookahead == 0
