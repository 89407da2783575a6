"""Ships device_profiles/ and the committed sample models inside the wheel as edgert/data/…

Everything else is declared in pyproject.toml.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["edgert", "edgert.*"])
    + ["edgert.data.device_profiles", "edgert.data.models"],
    package_dir={"edgert.data.device_profiles": "device_profiles", "edgert.data.models": "models"},
    package_data={
        "edgert": ["py.typed"],
        "edgert.data.device_profiles": ["*.toml", "README.md"],
        "edgert.data.models": ["*.onnx", "*.tflite", "*.json", "*.npz", "README.md"],
    },
    include_package_data=False,
)
