"""Distribution `nemotron-kernels`: fused Triton kernels and a torch.compile backend for Nemotron 3."""
from setuptools import find_packages, setup

setup(
    name="nemotron-kernels",
    version="0.1.0",
    description="NVFP4, Mamba-2 SSD and LatentMoE kernels and a torch.compile backend for Nemotron 3 hybrid models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["nemotron", "nemotron.*", "bench", "bench.*"]),
    # the two trained stdlib-tiny demo checkpoints (nemotron.model.demo_checkpoint)
    package_data={"nemotron.model": ["assets/*.json", "assets/*/*.json", "assets/*/*.safetensors"]},
    # torch is not pinned: a CPU machine installs its local CPU build first, a GPU machine keeps its own.
    # safetensors and tokenizers: the shipped demo checkpoints and their tokenizer.json
    install_requires=["torch>=2.6", "triton>=3.3", "numpy", "safetensors", "tokenizers>=0.20"],
    extras_require={
        # Triton 3.6's interpreter (the CPU test path) needs numpy < 2.3.
        # transformers only as a test oracle (HF NemotronH modules compared with ours).
        "test": ["pytest>=8", "hypothesis>=6.100", "pytest-benchmark>=4", "matplotlib", "safetensors", "numpy<2.3",
                 "transformers>=5.0", "tokenizers>=0.20", "tqdm"],
        # training the demo model on the standard library: a byte-level BPE (HF tokenizers), a progress bar
        "train": ["tokenizers>=0.20", "tqdm", "safetensors"],
        "bench": ["matplotlib", "pytest-benchmark>=4"],
        "cutlass": ["nvidia-cutlass", "cuda-python"],
    },
    entry_points={
        "torch_dynamo_backends": ["nemotron = nemotron.graph.backend:nemotron_backend"],
        "console_scripts": ["nemotron = nemotron.__main__:main"],
    },
)
