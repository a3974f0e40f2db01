"""cwm-jax: Meta's CWM (Code World Model) in JAX / Flax NNX.

The one place for dependencies. `kernels/` and `convert/` install as `cwm_jax.kernels` and `cwm_jax.convert`: a bare
top-level `kernels` package would collide with the PyPI distribution of that name that transformers looks for.
"""

from setuptools import setup

setup(
    name="cwm-jax",
    version="0.1.0",
    description="CWM (Code World Model) in JAX / Flax NNX: exact decoder, conversion, inference and training on TPUs",
    python_requires=">=3.11",
    packages=[
        "cwm_jax",
        "cwm_jax.data",
        "cwm_jax.train",
        "cwm_jax.kernels",
        "cwm_jax.convert",
        "cwm_jax.rl",
        "cwm_jax.traces",
    ],
    package_dir={"cwm_jax": "cwm_jax", "cwm_jax.kernels": "kernels", "cwm_jax.convert": "convert"},
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "ml-collections>=1.1.0",
        "sentencepiece>=0.2.0",
        "tiktoken>=0.7",
        "tokenizers>=0.20",
        "safetensors>=0.6",
        "ml-dtypes>=0.5",
        "numpy>=2.0",
        "tqdm>=4.66",
        # Training: Grain input pipelines over ArrayRecord / Parquet, TensorBoard event files without TensorFlow.
        "grain>=0.2.12",
        "array-record>=0.8",
        "pyarrow>=18",
        "tensorboardX>=2.6",
        # Weight-only int8 / int4 quantization (cwm_jax.quant): quantized arrays and their dot_general.
        "qwix>=0.1.8",
    ],
    extras_require={
        # torch==2.13.0: the CPU build (an unpinned torch pulls a multi-GB CUDA one); transformers has CwmForCausalLM.
        # nbclient, nbformat, ipykernel: tests/test_notebook.py executes notebooks/ on a tiny model.
        "test": [
            "torch==2.13.0",
            "transformers>=5.0",
            "pytest>=8",
            "ruff>=0.15",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
            "tensorflow-datasets>=4.9",
            # Property-based shapes for the attention kernels (tests/test_kernels_*.py).
            "hypothesis>=6.100",
        ],
        # TFDS datasets as Grain sources (`tfds.data_source`; no TensorFlow needed).
        "data": ["tensorflow-datasets>=4.9"],
        # jax[tpu] picks the libtpu that matches jax; with it a CPU host also compiles for TPU topologies.
        "tpu": ["jax[tpu]>=0.10.2"],
        "notebooks": ["jupyter", "nbformat", "nbclient", "ipykernel", "huggingface_hub"],
    },
    entry_points={
        "console_scripts": [
            "cwm-demo=cwm_jax.demo:main",
            "cwm-convert=cwm_jax.convert.cli:main",
            "cwm-tokenizer=cwm_jax.tokenizer_cli:main",
            "cwm-generate=cwm_jax.generate_cli:main",
            "cwm-plan=cwm_jax.plan:main",
            "cwm-data=cwm_jax.data.cli:main",
            "cwm-eval=cwm_jax.eval_cli:main",
            "cwm-debug=cwm_jax.traces.debugger:main",
        ]
    },
)
