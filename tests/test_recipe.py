from pathlib import Path

import pytest

from glassforge.core.errors import UserError
from glassforge.core.recipe import Recipe, builtin_recipes, dump_recipe, load_recipe, parse_recipe


def test_builtin_recipes_parse_and_round_trip():
    assert {"tiny", "default"} <= set(builtin_recipes())
    for name in builtin_recipes():
        recipe = load_recipe(name)
        again = parse_recipe(dump_recipe(recipe).encode(), "again")
        assert again == recipe
        assert again.hash() == recipe.hash()


def test_model_vocab_follows_tokenizer():
    recipe = load_recipe("tiny")
    assert recipe.model.vocab_size == recipe.tokenizer.vocab_size == 1024


def test_unknown_recipe_name_lists_builtins():
    with pytest.raises(UserError, match=r"unknown recipe 'nope' \(built in: .*tiny"):
        load_recipe("nope")


def test_malformed_toml_names_file(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nd_model = 3\n")
    with pytest.raises(UserError, match=r"recipe .*bad.toml: malformed TOML"):
        load_recipe(str(bad))


def test_unknown_field_and_wrong_type_are_named(tmp_path: Path):
    p = tmp_path / "r.toml"
    p.write_text("[model]\nd_modle = 64\n")
    with pytest.raises(UserError, match=r"model: unknown field 'd_modle'"):
        load_recipe(str(p))
    p.write_text("[pretrain]\nsteps = 'ten'\n")
    with pytest.raises(UserError, match=r"pretrain.steps: expected int, got 'ten'"):
        load_recipe(str(p))
    p.write_text("[model]\nd_model = 65\nn_heads = 4\n")
    with pytest.raises(UserError, match=r"d_model=65 is not a multiple of model.n_heads=4"):
        load_recipe(str(p))


def test_section_hash_changes_only_with_its_section():
    a, b = Recipe(), Recipe()
    b.sft.steps += 1
    assert a.section_hash("pretrain") == b.section_hash("pretrain")
    assert a.section_hash("sft") != b.section_hash("sft")
