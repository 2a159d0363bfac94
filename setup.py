"""kanana-jax: pre-, mid- and post-training of Kanana-2-style MoE language models in JAX."""
from setuptools import find_packages, setup

setup(
    name="kanana-jax",
    version="0.1.0",
    description="JAX/TPU research stack for Kanana-2-style Mixture-of-Experts language models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.12",
    packages=find_packages(include=["kanana_jax", "kanana_jax.*", "pallas_kernels", "pallas_kernels.*",
                                    "experiments", "experiments.*", "launch", "launch.*"]),
    package_data={
        "kanana_jax.data": ["corpus/*.jsonl", "corpus/reasoning/*.jsonl", "sft/*.jsonl", "preference/*.jsonl",
                            "prompts/*.jsonl"],
        "kanana_jax.evals": ["suites/*.jsonl"],
    },
    install_requires=[
        "jax==0.11.2",
        "flax>=0.12.10",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.4",
        "ml-collections>=1.1.0",
        "numpy",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "jinja2>=3.1",
        "tensorboardX>=2.6",
        "tqdm",
    ],
    extras_require={
        "tpu": ["jax[tpu]==0.11.2"],
        "viz": ["tensorboard>=2.16", "jupyterlab>=4.0"],   # the TensorBoard viewer and notebooks (docs)
        "gpu": ["jax[cuda13]==0.11.2"],
        "data": ["grain>=0.2", "array-record>=0.7", "tensorflow-datasets>=4.9"],
        "dev": ["pytest>=8", "pytest-xdist>=3.6", "pytest-timeout>=2.3", "hypothesis>=6.100", "pandas>=2.2",
                "matplotlib>=3.8", "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29", "grain>=0.2",
                "array-record>=0.7"],
    },
    entry_points={"console_scripts": ["kanana-jax=kanana_jax.cli:main"]},
)
