"""Model overrides are typed by the ModelConfig field they set, through one parser, whichever
flag spelled them (--model_override FIELD=VALUE, --gin.MACRO=VALUE, --gin.ModelConfig.FIELD)."""
import pytest

from openmoe_jax import gin_utils
from openmoe_jax.errors import UsageError
from openmoe_jax.model import config as config_lib


@pytest.mark.parametrize("item,want", [
    ("capacity_mode=fixed", {"capacity_mode": "fixed"}),      # a bare word: a str field
    ("capacity_mode='dropless'", {"capacity_mode": "dropless"}),
    ("no_drop=true", {"no_drop": True}), ("no_drop=False", {"no_drop": False}),
    ("min_expert_capacity=2", {"min_expert_capacity": 2}),
    ("eval_capacity_factor=2", {"eval_capacity_factor": 2.0}),
    ("dispatch=einsum", {"dispatch": "einsum"}),
])
def test_override_text_is_typed_by_its_field(item, want):
  got = config_lib.parse_overrides([item])
  assert got == want
  assert all(type(got[k]) is type(v) for k, v in want.items())
  assert config_lib.parse_overrides(config_lib.overrides_text(got)) == got  # reports round-trip


@pytest.mark.parametrize("item,needle", [
    ("min_expert_capacity=two", "must be an integer"), ("no_drop=maybe", "must be true or false"),
    ("eval_capacity_factor=x", "must be a number"), ("no_such_field=1", "not a ModelConfig field"),
    ("no_drop", "use FIELD=VALUE"),
])
def test_bad_override_is_a_value_error_naming_the_field(item, needle):
  with pytest.raises(ValueError, match=needle):
    config_lib.parse_overrides([item])


def test_gin_spellings_give_the_same_typed_values():
  assert gin_utils.model_overrides(["NO_DROP = True", "ModelConfig.capacity_mode = 'adaptive'",
                                    "MIN_EXPERT_CAPACITY=1", "ModelConfig.dispatch = gather"]) == {
      "no_drop": True, "capacity_mode": "adaptive", "min_expert_capacity": 1, "dispatch": "gather"}
  with pytest.raises(UsageError, match="must be an integer"):
    gin_utils.model_overrides(["MIN_EXPERT_CAPACITY = 1.5"])


def test_load_model_config_applies_typed_overrides(tmp_path):
  from openmoe_jax.model.config import ModelConfig
  from openmoe_jax.training import run_dir
  run_dir.write_run_files(str(tmp_path), "t", {"targets": 8}, operative_config="",
                          model_config=ModelConfig(), start_step=0, command="x", layout={})
  a = run_dir.load_model_config(str(tmp_path), ["capacity_mode=adaptive", "no_drop=true"])
  b = run_dir.load_model_config(str(tmp_path), {"capacity_mode": "adaptive", "no_drop": True})
  assert a == b == ModelConfig(capacity_mode="adaptive", no_drop=True)
  with pytest.raises(UsageError, match="capacity_mode"):
    run_dir.load_model_config(str(tmp_path), ["capacity_mode=sometimes"])
  with pytest.raises(UsageError, match="must be an integer"):
    run_dir.load_model_config(str(tmp_path), {"min_expert_capacity": "x"})
