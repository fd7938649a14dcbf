from setuptools import find_packages, setup

# CPU installs and CI pin torch==2.13.0 (the CPU wheel) and megatron-core 0.16.1 (the newest release for Python 3.11).
# GPU users install the `gpu` extra on Python >= 3.12 with a newer megatron-core; see README "GPU install".
TRACKING = ["wandb>=0.31", "mlflow-skinny>=3.0", "sqlalchemy", "alembic"]

setup(
    name="dapo_megatron",
    version="0.1.0",
    description="DAPO RL post-training for LLMs on megatron-core with an SGLang rollout",
    python_requires=">=3.10",
    packages=find_packages(include=["dapo_megatron", "dapo_megatron.*"]),
    package_data={"dapo_megatron": ["assets/**/*"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16.1",
        "psutil",  # undeclared dependency of megatron-core: dist_checkpointing.save hangs without it
        "numpy",
        "transformers>=4.51",
        "safetensors",
        "tokenizers",
        "tensorboard",
        "pyyaml",
        "tqdm",
        "pyarrow",
        "math-verify",
        "aiohttp",
    ],
    extras_require={
        # matplotlib: tools/ablation.py plots and `dapo-megatron report`; the tracking extra: tests/test_trackers.py
        "test": ["pytest>=8", "pytest-timeout", "matplotlib", *TRACKING],
        # trainer.loggers: wandb, mlflow (MLflow's local store is SQLite: sqlalchemy + alembic)
        "tracking": TRACKING,
        # sglang / sglang-router: the versions whose parser and router tests/test_sglang_cpu.py runs on CPU
        "gpu": ["transformer-engine[pytorch]", "sglang==0.5.23", "sglang-router==0.3.2"],
    },
    entry_points={"console_scripts": ["dapo-megatron=dapo_megatron.cli:main"]},
)
