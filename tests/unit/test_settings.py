"""glm.settings: every environment setting parsed by one helper, bad values refused by name."""
from __future__ import annotations

import pytest

from glm import settings
from glm.settings import SettingError

NAME = "GLM_TEST_SETTING"


@pytest.fixture
def env(monkeypatch):
    def set_(value):
        if value is None:
            monkeypatch.delenv(NAME, raising=False)
        else:
            monkeypatch.setenv(NAME, value)
    return set_


@pytest.mark.parametrize("value, want", [(None, 30.0), ("", 30.0), ("  ", 30.0), ("0", 0.0), ("2.5", 2.5),
                                         (" 10 ", 10.0), ("1e3", 1000.0)])
def test_number_accepts_finite_values_in_bounds(env, value, want):
    env(value)
    assert settings.number(NAME, 30.0) == want


@pytest.mark.parametrize("value", ["inf", "-inf", "Infinity", "nan", "NaN", "-1", "-0.001", "3601", "soon", "1,5"])
def test_number_refuses_inf_nan_negatives_and_garbage_by_name(env, value):
    env(value)
    with pytest.raises(SettingError) as e:
        settings.number(NAME, 30.0, at_most=3600)
    assert str(e.value) == f"{NAME}={value!r} must be a finite number >= 0 and <= 3600"


def test_number_above_refuses_zero(env):
    env("0")
    with pytest.raises(SettingError, match=f"{NAME}='0' must be a finite number > 0"):
        settings.number(NAME, 1.0, above=True)
    env("0.01")
    assert settings.number(NAME, 1.0, above=True) == 0.01


@pytest.mark.parametrize("value, want", [(None, 8), ("1", 1), ("64", 64), (" 3 ", 3)])
def test_integer(env, value, want):
    env(value)
    assert settings.integer(NAME, 8, at_least=1) == want


@pytest.mark.parametrize("value", ["0", "-2", "2.5", "1e3", "eight", "inf", "nan", "65536"])
def test_integer_refuses_by_name(env, value):
    env(value)
    with pytest.raises(SettingError) as e:
        settings.integer(NAME, 8, at_least=1, at_most=65535)
    assert str(e.value) == f"{NAME}={value!r} must be an integer >= 1 and <= 65535"


@pytest.mark.parametrize("value, want", [(None, False), ("", False), ("1", True), ("TRUE", True), ("yes", True),
                                         ("on", True), ("0", False), ("false", False), ("No", False), ("off", False)])
def test_flag(env, value, want):
    env(value)
    assert settings.flag(NAME) is want


def test_flag_refuses_what_it_cannot_read(env):
    env("enabled")
    with pytest.raises(SettingError, match=f"{NAME}='enabled' must be one of 1/true/yes/on or 0/false/no/off"):
        settings.flag(NAME)


def test_choice(env):
    env(None)
    assert settings.choice(NAME, "private", ("private", "shared")) == "private"
    env("Shared")
    assert settings.choice(NAME, "private", ("private", "shared")) == "shared"
    env("public")
    with pytest.raises(SettingError, match=f"{NAME}='public' must be one of private, shared"):
        settings.choice(NAME, "private", ("private", "shared"))


def test_a_setting_error_is_a_value_error_and_a_glm_error():
    import glm

    assert issubclass(SettingError, ValueError) and issubclass(SettingError, glm.GLMError)
