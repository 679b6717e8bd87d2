from setuptools import setup

setup(
    name="npbptt",
    version="0.1.0",
    description="Reference NumPy/Numba implementation of BPTT, truncated BPTT and adaptive "
                "truncation (Aicher, Foti & Fox, UAI 2019)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["npbptt", "npbptt.kernels"],
    package_dir={"npbptt": "npbptt", "npbptt.kernels": "kernels"},
    install_requires=["numpy>=2", "numba>=0.60", "scipy", "tqdm", "joblib>=1.4", "threadpoolctl",
                      "matplotlib"],
    extras_require={
        "test": ["pytest", "hypothesis", "pytest-xdist"],
        "torch": ["torch==2.13.0"],
        "jax": ["jax"],
        "dask": ["dask[distributed]"],
        # backend="cuda" on an NVIDIA GPU (CUDA 13 driver): NVIDIA's numba-cuda with the CUDA 13
        # toolkit libraries; numba-cuda 0.30.4 does not import with NumPy 2.5 (np.row_stack).
        "cuda": ["numba-cuda[cu13]>=0.30", "numpy<2.5"],
    },
    entry_points={"console_scripts": ["npbptt=npbptt.cli:main"]},
)
