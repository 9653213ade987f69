"""openmoe_jax: OpenMoE-style Mixture-of-Experts pretraining in JAX/Flax."""
import pathlib

import setuptools

ROOT = pathlib.Path(__file__).parent


def _requirements(name):
  lines = (ROOT / name).read_text().splitlines()
  return [l.split("#")[0].strip() for l in lines
          if l.split("#")[0].strip() and not l.startswith("-r")]


setuptools.setup(
    name="openmoe_jax",
    version="0.1.0",
    description="OpenMoE Mixture-of-Experts pretraining in JAX/Flax: model, routing, data, training.",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["openmoe_jax", "openmoe_jax.*", "tasks", "tasks.*"])
    + ["openmoe_jax.gin_files"],
    # The top-level gin/ folder ships inside the package as openmoe_jax.gin_files, so --gin_file
    # finds the configs after a plain (non-editable) install too.
    package_dir={"openmoe_jax.gin_files": "gin"},
    package_data={"openmoe_jax": ["assets/*"], "openmoe_jax.gin_files": ["*.gin", "*/*.gin"]},
    include_package_data=True,
    install_requires=_requirements("requirements.txt"),
    extras_require={
        "export": ["torch==2.13.0", "safetensors==0.8.0", "transformers==5.24.0"],
        "test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "torch==2.13.0", "safetensors==0.8.0", "transformers==5.24.0",
                 "libtpu==0.0.42.*"],
        # XLA:TPU for TPU runs and for compile-only TPU plans on any machine (openmoe-info
        # --tpu, openmoe-train --compile_only): the libtpu that jax[tpu]==0.10.2 pins.
        "tpu": ["libtpu==0.0.42.*"],
    },
    entry_points={
        "console_scripts": [
            "openmoe-info=openmoe_jax.commands.info:main",
            "openmoe-train=openmoe_jax.commands.train:main",
            "openmoe-eval=openmoe_jax.commands.evaluate:main",
            "openmoe-score=openmoe_jax.commands.score:main",
            "openmoe-analyze=openmoe_jax.commands.analyze:main",
            "openmoe-export=openmoe_jax.commands.export:main",
            "openmoe-import=openmoe_jax.commands.import_model:main",
            "openmoe-infer=openmoe_jax.commands.infer:main",
        ],
    },
)
