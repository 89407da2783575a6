"""Ships device_profiles/, the committed sample models and the example daemon config inside the wheel
as edgert/data/… (``edgert config example`` prints packaging/edgert.toml from there).

Everything else is declared in pyproject.toml.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["edgert", "edgert.*"])
    + ["edgert.data.device_profiles", "edgert.data.models", "edgert.data.packaging"],
    package_dir={
        "edgert.data.device_profiles": "device_profiles",
        "edgert.data.models": "models",
        "edgert.data.packaging": "packaging",
    },
    package_data={
        "edgert": ["py.typed"],
        "edgert.data.device_profiles": ["*.toml", "README.md"],
        "edgert.data.models": ["*.onnx", "*.tflite", "*.json", "*.npz", "README.md"],
        "edgert.data.packaging": ["edgert.toml"],
    },
    include_package_data=False,
)
