"""The functions the run gins bind, made gin configurables here, at the commands (as t5x's
`train_using_gin = gin.configurable(train)`), under the names gin files and saved `config.gin`
files use: `train.*` (`openmoe_jax.train.train`) and
`openmoe_jax.evaluate.evaluate_checkpoint.*`. The library functions themselves know no gin.
"""
import gin

from openmoe_jax.evaluation import checkpoint_eval
from openmoe_jax.training import loop

train = gin.external_configurable(loop.train, name="train", module="openmoe_jax.train",
                                  denylist=["model_config"])
evaluate_checkpoint = gin.external_configurable(
    checkpoint_eval.evaluate_checkpoint, name="evaluate_checkpoint", module="openmoe_jax.evaluate")
