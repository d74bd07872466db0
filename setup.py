"""vlm_jax: vision-language pretraining (CLIP, SigLIP, LiT, captioning, VLMs) in JAX."""

from setuptools import find_packages, setup

setup(
    name="vlm_jax",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11",
    packages=find_packages(include=["vlm_jax", "vlm_jax.*", "data_pipelines", "data_pipelines.*"]),
    # Ranges tested in CI; the lower bounds are the versions the code was written against.
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "grain>=0.2.18,<0.3",
        "tensorflow-datasets>=4.9.10,<5",
        "sentencepiece>=0.2.3,<0.3",
        "ml_collections>=1.1,<2",
        "numpy>=2.0,<3",
        "pillow>=11,<14",
        "simplejpeg>=1.8,<2",
        "opencv-python-headless>=4.10,<6",
        "fsspec[http]>=2024.6",
        "tensorboardX>=2.6.5,<3",
        "etils[epath]>=1.7",  # the workdir filesystem layer (vlm_jax/workdir.py), as orbax uses
    ],
    extras_require={
        # pycocoevalcap: the reference BLEU / CIDEr-D scorers that tests/test_caption_metrics.py compares against
        # (a 104 MB wheel, mostly METEOR and SPICE jars that are never used; no Java needed for those two)
        "test": ["pytest>=8,<10", "pytest-xdist>=3.6,<4", "pycocoevalcap>=1.2,<2"],
        # libtpu: the real TPU compiler, so programs compile for TPU topologies from any host (and run on TPU VMs)
        "tpu": ["jax[tpu]>=0.10.2,<0.11"],
        "cloud": ["gcsfs", "s3fs"],  # gs:// and s3:// shards and workdirs
        "hf": ["torch==2.13.0", "transformers>=5.0,<6", "safetensors>=0.5,<1"],
        "wandb": ["wandb>=0.31,<1"],  # Weights & Biases logging (config.wandb.project; vlm_jax/wandb_writer.py)
    },
)
