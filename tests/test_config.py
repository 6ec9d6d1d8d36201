"""Recipes: validation errors name the field and what is allowed; built-ins by name."""

from __future__ import annotations

import pytest

from potstill.config import RecipeError, dump_recipe
from potstill.recipes import builtin_recipes, load_recipe, parse_recipe


def error_of(data: dict) -> str:
    with pytest.raises(RecipeError) as info:
        parse_recipe({"task": "image-classification", **data})
    return str(info.value)


def test_unknown_keys_get_did_you_mean():
    assert "unknown field 'distilation'" in error_of({"distilation": {}})
    assert "Did you mean 'distillation'?" in error_of({"distilation": {}})
    message = error_of({"train": {"epoch": 3}})
    assert "'train.epoch'" in message and "Did you mean 'epochs'?" in message


@pytest.mark.parametrize(("data", "field", "expected"), [
    ({"distillation": {"temperature": 0}}, "distillation.temperature", "greater than 0"),
    ({"distillation": {"temperature": -2.0}}, "distillation.temperature", "greater than 0"),
    ({"distillation": {"alpha": 1.5}}, "distillation.alpha", "less than or equal to 1"),
    ({"distillation": {"alpha": -0.1}}, "distillation.alpha", "greater than or equal to 0"),
    ({"train": {"epochs": "ten"}}, "train.epochs", "valid integer"),
    ({"train": {"optimizer": "adam"}}, "train.optimizer", "'adamw' or 'sgd'"),
    ({"student": {"hidden_sizes": [64, 0]}}, "student.hidden_sizes", ">= 1"),
    ({"distillation": {"loss": "jds"}}, "distillation.loss", "did you mean 'jsd'"),
    ({"distillation": {"loss": "kl", "params": {"beta": 0.5}}}, "distillation", "no parameter 'beta'"),
    ({"distillation": {"features": [{"student": "a", "teacher": "b", "loss": "cosin"}]}},
     "distillation.features.0.loss", "did you mean 'cosine'"),
    ({"distillation": {"features": [{"student": "a", "teacher": "b", "loss": "kl"}]}},
     "distillation.features.0.loss", "'kl' does not compare features; allowed: attention, attention_kl, cosine, mse"),
])
def test_bad_values_name_the_field_and_allowed_values(data, field, expected):
    message = error_of(data)
    assert f"'{field}'" in message and expected in message


def dump_recipe_to(path, recipe):
    path.write_text(dump_recipe(recipe))
    return path


def test_builtin_recipes_by_name_and_overrides(tmp_path):
    assert "mnist" in builtin_recipes()
    recipe = load_recipe("mnist", ["train.epochs=2", "distillation.loss=jsd", "distillation.params={beta: 0.3}"])
    assert recipe.train.epochs == 2 and recipe.distillation.params == {"beta": 0.3}
    # the resolved recipe round-trips through YAML
    path = tmp_path / "r.yaml"
    path.write_text(dump_recipe(recipe))
    assert load_recipe(path) == recipe
    with pytest.raises(RecipeError, match=r"built-in recipes: .*mnist"):
        load_recipe("no-such-recipe")
    for name in builtin_recipes():  # every shipped recipe validates and round-trips
        assert load_recipe(dump_recipe_to(tmp_path / f"{name}.yaml", load_recipe(name))) == load_recipe(name)
    with pytest.raises(RecipeError, match=r"section\.field=value"):
        load_recipe("mnist", ["train.epochs"])


def test_yaml_no_and_off_mean_what_they_say():
    recipe = load_recipe("mnist", ["train.mixed_precision=no", "train.fused_loss=off", "baseline=no"])
    assert recipe.train.mixed_precision == "no" and recipe.train.fused_loss is False and recipe.baseline is False
    assert load_recipe("mnist", ["train.fused_loss=true"]).train.fused_loss is True


def test_feature_term_losses_are_the_registrys(monkeypatch):
    from potstill.losses import LOSSES, LossSpec, cosine_loss

    def feature_term(loss: str) -> dict:
        return {"task": "image-classification",
                "distillation": {"features": [{"student": "a", "teacher": "b", "loss": loss}]}}

    for loss in ("mse", "cosine", "attention", "attention_kl", "similarity"):
        assert parse_recipe(feature_term(loss)).distillation.features[0].loss == loss
    assert "unknown feature loss 'my_feature_loss'" in error_of(feature_term("my_feature_loss"))
    monkeypatch.setitem(LOSSES, "my_feature_loss", LossSpec(cosine_loss, "features"))  # one line in the registry
    assert parse_recipe(feature_term("my_feature_loss")).distillation.features[0].loss == "my_feature_loss"
