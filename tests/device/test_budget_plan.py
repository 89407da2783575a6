"""The memory budget's pure parts: the eviction decision, the footprint rule, the config keys, the primer."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgert.config import parse_config
from edgert.device.budget import FITS, MIB, NEVER, WAIT, Loaded, footprint_of, plan_room, prime_runtime
from edgert.errors import ConfigError


def _m(name: str, mb: int, *, pinned: bool = False, busy: bool = False, used: int = 0) -> Loaded:
    return Loaded(name, mb * MIB, pinned, busy, used)


def test_fits_without_unloading_anything() -> None:
    assert plan_room([_m("a", 2, used=1)], 3 * MIB, 5 * MIB) == plan_room([], 3 * MIB, 5 * MIB)
    assert plan_room([_m("a", 2)], 3 * MIB, 5 * MIB).verdict == FITS


def test_least_recently_used_idle_unpinned_go_first_and_no_more_than_needed() -> None:
    loaded = [_m("old", 1, used=1), _m("pinned", 1, pinned=True, used=0), _m("busy", 1, busy=True, used=2),
              _m("mid", 1, used=3), _m("new", 1, used=9)]
    room = plan_room(loaded, 2 * MIB, 5 * MIB)
    assert room.verdict == FITS and room.victims == ("old", "mid")


def test_busy_models_make_it_wait_and_pinned_ones_make_it_never() -> None:
    assert plan_room([_m("busy", 4, busy=True)], 2 * MIB, 5 * MIB).verdict == WAIT
    never = plan_room([_m("p", 4, pinned=True)], 2 * MIB, 5 * MIB, name="model 'x'")
    assert never.verdict == NEVER and "pinned models hold 4.0 MB" in never.why
    whole = plan_room([], 6 * MIB, 5 * MIB, name="model 'x'")
    assert whole.verdict == NEVER and "more than the whole memory budget (5.0 MB)" in whole.why


def test_loads_in_progress_count() -> None:
    assert plan_room([], 2 * MIB, 5 * MIB, pending=4 * MIB).verdict == WAIT


@given(st.lists(st.tuples(st.integers(0, 8), st.booleans(), st.booleans()), max_size=12),
       st.integers(0, 10), st.integers(1, 20))
def test_a_fitting_plan_always_ends_under_the_budget(models: list[tuple[int, bool, bool]], need: int,
                                                      budget: int) -> None:
    loaded = [Loaded(f"m{i}", mb, pinned, busy, i) for i, (mb, pinned, busy) in enumerate(models)]
    room = plan_room(loaded, need, budget)
    if room.verdict != FITS:
        return
    victims = {v for v in room.victims}
    assert all(not m.pinned and not m.busy for m in loaded if m.name in victims)
    assert sum(m.footprint for m in loaded if m.name not in victims) + need <= budget


def test_footprint_is_the_rss_growth_never_below_the_decrypted_size() -> None:
    assert footprint_of(100, 350, 50) == 250
    assert footprint_of(100, 90, 50) == 50  # memory freed meanwhile: the model's size is the floor
    assert footprint_of(None, None, 50) == 50


def test_config_keys_parse_and_bad_values_name_key_and_allowed_values() -> None:
    cfg = parse_config("[daemon]\nmemory_budget_mb = 64\n[[models]]\nname = 'a'\nload = 'lazy'\npin = true\n")
    assert cfg.memory_budget_mb == 64 and cfg.models[0].load == "lazy" and cfg.models[0].pin
    assert parse_config("[[models]]\nname = 'a'\n").models[0].load == "eager"
    for text, fragments in [
        ("[[models]]\nname = 'a'\nload = 'later'", ["f.toml", "models[0].load", "eager, lazy"]),
        ("[[models]]\nname = 'a'\npin = 'yes'", ["models[0].pin"]),
        ("[daemon]\nmemory_budget_mb = -1", ["daemon.memory_budget_mb", ">= 0"]),
        ("[daemon]\nmemory_budget_mb = 'big'", ["daemon.memory_budget_mb", "a number"]),
        ("[[models]]\nname = 'a'\nload = 'lazy'\n[[models]]\nname = 'b'\n[[cascades]]\nname = 'c'\n"
         "small = 'a'\nlarge = 'b'", ["cascades[0].small", 'load = "lazy"', "allowed for members: eager"]),
        ("[[models]]\nname = 'a'\nload = 'lazy'\n[[pipelines]]\nname = 'p'\n"
         "input = { name = 'x', dtype = 'float32', shape = [-1, 64] }\n"
         "stages = [{ op = 'model', model = 'a' }]",
         ["pipelines[0].stages", "'a'", "allowed for members: eager"]),
    ]:
        with pytest.raises(ConfigError) as info:
            parse_config(text, "f.toml")
        assert all(f in str(info.value) for f in fragments), (text, str(info.value))


def test_the_primer_is_a_valid_onnx_model() -> None:
    from edgert.runtime import Runtime

    loaded: list[object] = []

    class Spy:
        def load(self, data: bytes, **kw: object) -> object:
            model = Runtime(profile="cpu-generic").load(data, **kw)  # type: ignore[arg-type]
            loaded.append(model)
            return model

    prime_runtime(Spy())
    (model,) = loaded
    assert [s.name for s in model.inputs] == ["x"] and [s.name for s in model.outputs] == ["y"]  # type: ignore[attr-defined]
